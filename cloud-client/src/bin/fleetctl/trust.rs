//! `fleetctl trust ...`: the key ceremony of the fleet's chain of trust (offline: create keys
//! and the first root, draft the next root, sign it on separate machines, combine, verify,
//! show) and the gateway's side (publish a root, read what it distributes).
//!
//! Every signature goes through the `Signer` trait, so a key file can be replaced by an HSM
//! without changing the documents.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use ed25519_dalek::pkcs8::DecodePublicKey as _;
use ed25519_dalek::{Signature as Ed25519Signature, VerifyingKey};
use fleet_certs::{TrustFiles, TrustSpec};
use fleet_proto::signing::{key_id, Signer, UpdateSigner};
use fleet_proto::trust::{
    build, TrustedRoot, MAX_ROLE_KEYS, MAX_SIGNED_ROOT_LEN, ROOT_CONTEXT, ROOT_FORMAT_VERSION,
};
use fleet_proto::v1::{self, SignatureAlgorithm};
use fleet_proto::Message as _;
use serde::Serialize;

use crate::{connect, duration, print_json, Conn, Failure};

#[derive(Subcommand)]
pub enum TrustCmd {
    /// Create the keys of every role and the first root (version 1), signed by the first
    /// THRESHOLD root keys.
    ///
    /// Writes DIR/root-N.key/.pub, DIR/updates-N.key/.pub, DIR/commands-N.key/.pub (private
    /// keys PKCS#8 PEM, mode 0600) and DIR/root.bin, which devices are provisioned with. Move
    /// the root keys offline, one per holder.
    Init {
        /// Directory to create the keys and root.bin in (refused if it already holds a root).
        #[arg(long)]
        dir: PathBuf,
        /// Number of root keys.
        #[arg(long, default_value_t = 3)]
        root_keys: u32,
        /// How many root keys must sign a root.
        #[arg(long, default_value_t = 2)]
        root_threshold: u32,
        /// Number of updates keys (sign manifests).
        #[arg(long, default_value_t = 1)]
        updates_keys: u32,
        /// How many updates keys must sign a manifest.
        #[arg(long, default_value_t = 1)]
        updates_threshold: u32,
        /// Number of commands keys (sign commands and update withdrawals).
        #[arg(long, default_value_t = 1)]
        commands_keys: u32,
        /// How many commands keys must sign a command.
        #[arg(long, default_value_t = 1)]
        commands_threshold: u32,
        /// The root expires this long from now (e.g. 365d); devices then refuse everything
        /// until a newer root arrives.
        #[arg(long, default_value = "365d", value_parser = duration)]
        expires: Duration,
    },
    /// Create one role key: FILE (PKCS#8 PEM, mode 0600, never overwritten) and its public key
    /// (FILE with .pub in place of .key, or FILE.pub), for `trust new --set-role ... --key`.
    Keygen {
        /// Where to write the private key (e.g. commands-2.key).
        #[arg(long)]
        out: PathBuf,
    },
    /// Draft the next root from the current one: version + 1, with a role's keys replaced or
    /// a key removed, and a new expiry. The draft has no signatures: sign it with `trust sign`
    /// (a threshold of the current root keys AND of the new root's own), then `trust combine`.
    New {
        /// The current root (SignedRoot file).
        #[arg(long)]
        current: PathBuf,
        /// Replace the keys of this role (root, updates or commands) with the --key files and
        /// --threshold.
        #[arg(long, value_parser = ["root", "updates", "commands"], requires_all = ["keys", "threshold"])]
        set_role: Option<String>,
        /// A public key (SubjectPublicKeyInfo PEM, KEY.pub) of the role set by --set-role
        /// (repeatable).
        #[arg(long = "key", requires = "set_role")]
        keys: Vec<PathBuf>,
        /// How many keys of the role set by --set-role must sign.
        #[arg(long, requires = "set_role")]
        threshold: Option<u32>,
        /// Remove this key id from every role that names it (a leaked or retired key;
        /// repeatable).
        #[arg(long = "remove-key", value_name = "KEYID")]
        remove_keys: Vec<String>,
        /// The new root expires this long from now.
        #[arg(long, default_value = "365d", value_parser = duration)]
        expires: Duration,
        /// Where to write the unsigned draft.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add one signature to a root (a draft or a partly signed part) with one key; run it on
    /// the machine that holds the key, then bring the parts together with `trust combine`.
    Sign {
        /// The root to sign.
        file: PathBuf,
        /// The private key (PKCS#8 PEM).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signed part.
        #[arg(long)]
        out: PathBuf,
    },
    /// Combine parts signed separately (over the same root) into one root with every
    /// signature, each key once.
    Combine {
        /// The signed parts.
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// Where to write the combined root.
        #[arg(long)]
        out: PathBuf,
    },
    /// Would a device holding --current accept FILE? Exit 0 and "accepted", or exit 1 with the
    /// reason a device would report (not newer, untrusted, self-unsigned, expired, ...).
    /// Without --current, FILE is checked as a first root (signed by a threshold of its own
    /// root keys, not expired).
    Verify {
        /// The root a device holds now.
        #[arg(long)]
        current: Option<PathBuf>,
        /// The root offered.
        file: PathBuf,
    },
    /// Show a root: version, expiry, each role's key ids and threshold, and its signatures
    /// (with --json: one JSON document).
    Show {
        /// The root (SignedRoot file).
        file: PathBuf,
    },
    /// Hand a signed root to the gateway, which distributes it to every device (it accepts
    /// only the successor of the root it holds, by the devices' rules).
    Publish {
        /// The signed root.
        file: PathBuf,
    },
    /// The roots the gateway distributes.
    Status,
}

/// A key of a role, as shown.
#[derive(Serialize)]
struct RoleView {
    threshold: u32,
    key_ids: Vec<String>,
}

/// A signature, as shown.
#[derive(Serialize)]
struct SignatureView {
    key_id: String,
    /// "root" when the key is a root key of this root and the signature verifies, "invalid"
    /// when it is one and the signature does not verify, "other" for any other key (the
    /// previous root's keys sign a rotation).
    by: &'static str,
}

/// A root, as shown.
#[derive(Serialize)]
struct RootView {
    version: u64,
    expires_at_ms: u64,
    expires_at: String,
    expired: bool,
    root: Option<RoleView>,
    updates: Option<RoleView>,
    commands: Option<RoleView>,
    signatures: Vec<SignatureView>,
    /// Valid signatures by this root's own root keys.
    self_signatures: usize,
}

fn role_view(r: Option<&v1::RoleKeys>) -> Option<RoleView> {
    r.map(|r| RoleView {
        threshold: r.threshold,
        key_ids: r
            .keys
            .iter()
            .map(|k| {
                raw_key(&k.key).map_or_else(
                    || format!("<bad key {}>", hex::encode(&k.key)),
                    |vk| key_id(&vk),
                )
            })
            .collect(),
    })
}

fn raw_key(bytes: &[u8]) -> Option<VerifyingKey> {
    let b: [u8; 32] = bytes.try_into().ok()?;
    VerifyingKey::from_bytes(&b).ok()
}

fn usage(m: impl Into<String>) -> Failure {
    Failure::Usage(m.into())
}

fn read(path: &Path) -> Result<Vec<u8>, Failure> {
    let bytes = std::fs::read(path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    if bytes.len() > MAX_SIGNED_ROOT_LEN {
        return Err(usage(format!(
            "{}: {} bytes; a root is at most {MAX_SIGNED_ROOT_LEN}",
            path.display(),
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// A SignedRoot file and the Root inside (decoded only: nothing is trusted here).
fn read_root(path: &Path) -> Result<(v1::SignedRoot, v1::Root), Failure> {
    let bytes = read(path)?;
    let signed = v1::SignedRoot::decode(bytes.as_slice())
        .map_err(|e| usage(format!("{}: not a signed root: {e}", path.display())))?;
    let root = v1::Root::decode(signed.root.as_slice())
        .map_err(|e| usage(format!("{}: not a root: {e}", path.display())))?;
    Ok((signed, root))
}

/// Writes a file that must not exist yet (a root or a part is never overwritten by mistake).
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    if path.exists() {
        return Err(usage(format!(
            "{} exists; it is never overwritten",
            path.display()
        )));
    }
    fleet_certs::files::write_atomic(path, bytes, false).map_err(|e| usage(e.to_string()))
}

fn load_signer(path: &Path) -> Result<UpdateSigner, Failure> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("--key {}: {e}", path.display())))?;
    UpdateSigner::from_pkcs8_pem(&pem).map_err(|e| usage(format!("--key {}: {e}", path.display())))
}

fn load_public(path: &Path) -> Result<VerifyingKey, Failure> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("--key {}: {e}", path.display())))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| {
        usage(format!(
            "--key {}: not an Ed25519 public key (KEY.pub): {e}",
            path.display()
        ))
    })
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn time_text(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime_serde::re::humantime::format_rfc3339_seconds(t).to_string()
}

/// Checks a role of a draft as a device will (keys, distinct, threshold in range).
fn check_role(name: &str, r: Option<&v1::RoleKeys>) -> Result<(), Failure> {
    let r = r.ok_or_else(|| usage(format!("role {name} is missing")))?;
    let n = r.keys.len();
    if n == 0 || n > MAX_ROLE_KEYS {
        return Err(usage(format!(
            "role {name} would have {n} keys; 1 to {MAX_ROLE_KEYS} are allowed"
        )));
    }
    let mut ids = std::collections::BTreeSet::new();
    for k in &r.keys {
        let vk = raw_key(&k.key).ok_or_else(|| usage(format!("role {name}: a key is invalid")))?;
        if !ids.insert(key_id(&vk)) {
            return Err(usage(format!(
                "role {name} would name key {} twice",
                key_id(&vk)
            )));
        }
    }
    if r.threshold == 0 || r.threshold as usize > n {
        return Err(usage(format!(
            "role {name} would need {} of {n} keys; the threshold must be 1 to {n}",
            r.threshold
        )));
    }
    Ok(())
}

fn view(signed: &v1::SignedRoot, root: &v1::Root, now_ms: u64) -> RootView {
    let own: Vec<(String, VerifyingKey)> = root
        .root
        .iter()
        .flat_map(|r| r.keys.iter())
        .filter_map(|k| raw_key(&k.key))
        .map(|vk| (key_id(&vk), vk))
        .collect();
    let msg = [ROOT_CONTEXT, signed.root.as_slice()].concat();
    let signatures: Vec<SignatureView> = signed
        .signatures
        .iter()
        .map(|s| {
            let by = match own.iter().find(|(id, _)| *id == s.key_id) {
                None => "other",
                Some((_, vk)) => {
                    let ok = s.algorithm == SignatureAlgorithm::Ed25519 as i32
                        && Ed25519Signature::from_slice(&s.signature)
                            .is_ok_and(|sig| vk.verify_strict(&msg, &sig).is_ok());
                    if ok {
                        "root"
                    } else {
                        "invalid"
                    }
                }
            };
            SignatureView {
                key_id: s.key_id.clone(),
                by,
            }
        })
        .collect();
    let mut own_valid: Vec<&str> = signatures
        .iter()
        .filter(|s| s.by == "root")
        .map(|s| s.key_id.as_str())
        .collect();
    own_valid.sort_unstable();
    own_valid.dedup();
    RootView {
        version: root.version,
        expires_at_ms: root.expires_at_ms,
        expires_at: time_text(root.expires_at_ms),
        expired: now_ms >= root.expires_at_ms,
        root: role_view(root.root.as_ref()),
        updates: role_view(root.updates.as_ref()),
        commands: role_view(root.commands.as_ref()),
        self_signatures: own_valid.len(),
        signatures,
    }
}

fn print_view(v: &RootView, json: bool) {
    if json {
        print_json(v);
        return;
    }
    println!(
        "root version {}, expires {}{}",
        v.version,
        v.expires_at,
        if v.expired { " (EXPIRED)" } else { "" }
    );
    for (name, r) in [
        ("root", &v.root),
        ("updates", &v.updates),
        ("commands", &v.commands),
    ] {
        match r {
            Some(r) => println!(
                "  {name:<9} {} of {}: {}",
                r.threshold,
                r.key_ids.len(),
                r.key_ids.join(" ")
            ),
            None => println!("  {name:<9} MISSING"),
        }
    }
    let need = v.root.as_ref().map_or(0, |r| r.threshold);
    println!(
        "  signatures: {} ({} valid by its own root keys, {need} needed)",
        v.signatures.len(),
        v.self_signatures
    );
    for s in &v.signatures {
        let by = match s.by {
            "root" => "root key of this root",
            "invalid" => "root key of this root, INVALID signature",
            _ => "another key (e.g. a root key of the previous root)",
        };
        println!("    {} {by}", s.key_id);
    }
}

#[derive(Serialize)]
struct Verdict {
    accepted: bool,
    version: u64,
    current_version: Option<u64>,
    refusal: Option<String>,
    reason: Option<String>,
}

#[derive(Serialize)]
struct TrustStatusView {
    version: u64,
    expires_at_ms: u64,
    expires_at: Option<String>,
    chain_versions: Vec<u64>,
}

fn trust_status(r: &cloud_client::TrustRecord, json: bool) {
    let chain_versions = r
        .chain
        .iter()
        .flat_map(|c| c.roots.iter())
        .map(|b| {
            v1::SignedRoot::decode(b.as_slice())
                .ok()
                .and_then(|s| v1::Root::decode(s.root.as_slice()).ok())
                .map_or(0, |r| r.version)
        })
        .collect();
    let v = TrustStatusView {
        version: r.version,
        expires_at_ms: r.expires_at_ms,
        expires_at: (r.version != 0).then(|| time_text(r.expires_at_ms)),
        chain_versions,
    };
    if json {
        print_json(&v);
    } else if v.version == 0 {
        println!("the gateway distributes no root");
    } else {
        println!(
            "the gateway distributes root version {} (expires {}); chain: {:?}",
            v.version,
            v.expires_at.as_deref().unwrap_or("-"),
            v.chain_versions
        );
    }
}

pub async fn run(cmd: TrustCmd, conn: &Conn, json: bool) -> Result<ExitCode, Failure> {
    let now = fleet_proto::time::now_ms();
    match cmd {
        TrustCmd::Init {
            dir,
            root_keys,
            root_threshold,
            updates_keys,
            updates_threshold,
            commands_keys,
            commands_threshold,
            expires,
        } => {
            let spec = TrustSpec {
                root: (root_keys, root_threshold),
                updates: (updates_keys, updates_threshold),
                commands: (commands_keys, commands_threshold),
                expires_at_ms: now.saturating_add(ms(expires)),
            };
            let files = TrustFiles::create(&dir, &spec, None).map_err(|e| usage(e.to_string()))?;
            let (signed, root) = read_root(&files.root_path())?;
            if !json {
                println!(
                    "wrote the keys and {} to {}; provision devices with root.bin and keep the root keys offline",
                    files.root_path().display(),
                    files.dir().display()
                );
            }
            print_view(&view(&signed, &root, now), json);
            Ok(ExitCode::SUCCESS)
        }
        TrustCmd::Keygen { out } => {
            let key = UpdateSigner::generate();
            let private = key
                .to_pkcs8_pem()
                .map_err(|e| usage(format!("cannot encode the key: {e}")))?;
            let public = key
                .public_key_pem()
                .map_err(|e| usage(format!("cannot encode the key: {e}")))?;
            let pub_path = if out.extension().is_some_and(|e| e == "key") {
                out.with_extension("pub")
            } else {
                PathBuf::from(format!("{}.pub", out.display()))
            };
            if pub_path.exists() {
                return Err(usage(format!(
                    "{} exists; it is never overwritten",
                    pub_path.display()
                )));
            }
            crate::update::write_private(&out, private.as_bytes())?;
            write_new(&pub_path, public.as_bytes())?;
            if json {
                print_json(&serde_json::json!({
                    "key_id": key.key_id(),
                    "private_key": out,
                    "public_key": pub_path,
                }));
            } else {
                println!(
                    "key {} written to {} (public key: {})",
                    key.key_id(),
                    out.display(),
                    pub_path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TrustCmd::New {
            current,
            set_role,
            keys,
            threshold,
            remove_keys,
            expires,
            out,
        } => {
            let (_, mut root) = read_root(&current)?;
            TrustedRoot::provisioned(&read(&current)?)
                .map_err(|e| usage(format!("--current {}: {e}", current.display())))?;
            root.format_version = ROOT_FORMAT_VERSION;
            root.version = root
                .version
                .checked_add(1)
                .ok_or_else(|| usage("the current version is the last one"))?;
            root.expires_at_ms = now.saturating_add(ms(expires));
            if let Some(role) = set_role.as_deref() {
                let vks = keys
                    .iter()
                    .map(|p| load_public(p))
                    .collect::<Result<Vec<_>, _>>()?;
                let r = build::role(&vks, threshold.unwrap_or(0));
                match role {
                    "root" => root.root = Some(r),
                    "updates" => root.updates = Some(r),
                    _ => root.commands = Some(r),
                }
            }
            for id in &remove_keys {
                let mut found = false;
                for r in [&mut root.root, &mut root.updates, &mut root.commands]
                    .into_iter()
                    .flatten()
                {
                    let before = r.keys.len();
                    r.keys
                        .retain(|k| raw_key(&k.key).is_none_or(|vk| key_id(&vk) != *id));
                    found |= r.keys.len() != before;
                }
                if !found {
                    return Err(usage(format!("--remove-key {id}: no role names this key")));
                }
            }
            check_role("root", root.root.as_ref())?;
            check_role("updates", root.updates.as_ref())?;
            check_role("commands", root.commands.as_ref())?;
            let draft = build::encode(&root);
            write_new(&out, &draft.encode_to_vec())?;
            if !json {
                println!(
                    "wrote the unsigned draft of root version {} to {}; sign it with a threshold of the current root keys and of its own",
                    root.version,
                    out.display()
                );
            }
            print_view(&view(&draft, &root, now), json);
            Ok(ExitCode::SUCCESS)
        }
        TrustCmd::Sign { file, key, out } => {
            let (mut signed, root) = read_root(&file)?;
            let signer = load_signer(&key)?;
            let signer: &dyn Signer = &signer;
            build::add_signature(signer, &mut signed).map_err(|e| usage(e.to_string()))?;
            write_new(&out, &signed.encode_to_vec())?;
            if !json {
                println!(
                    "signed root version {} with key {}; wrote {}",
                    root.version,
                    signer.key_id(),
                    out.display()
                );
            }
            print_view(&view(&signed, &root, now), json);
            Ok(ExitCode::SUCCESS)
        }
        TrustCmd::Combine { parts, out } => {
            let mut signed = Vec::with_capacity(parts.len());
            for p in &parts {
                signed.push(read_root(p)?.0);
            }
            let combined = build::combine(&signed).map_err(|e| usage(e.to_string()))?;
            let root = v1::Root::decode(combined.root.as_slice())
                .map_err(|e| usage(format!("not a root: {e}")))?;
            write_new(&out, &combined.encode_to_vec())?;
            if !json {
                println!(
                    "combined {} part(s) of root version {}: {} signature(s); wrote {}",
                    parts.len(),
                    root.version,
                    combined.signatures.len(),
                    out.display()
                );
            }
            print_view(&view(&combined, &root, now), json);
            Ok(ExitCode::SUCCESS)
        }
        TrustCmd::Verify { current, file } => {
            let offered = read(&file)?;
            let (version, current_version, result) = match &current {
                Some(c) => {
                    let held = TrustedRoot::provisioned(&read(c)?)
                        .map_err(|e| usage(format!("--current {}: {e}", c.display())))?;
                    let r = held.accept_next(&offered, now);
                    let version = read_root(&file)?.1.version;
                    (version, Some(held.version), r.map(|_| ()))
                }
                None => {
                    let r = TrustedRoot::provisioned(&offered).and_then(|r| {
                        if r.expired(now) {
                            Err(fleet_proto::trust::TrustError::Expired {
                                version: r.version,
                                expires_at_ms: r.expires_at_ms,
                                now_ms: now,
                            })
                        } else {
                            Ok(())
                        }
                    });
                    (read_root(&file)?.1.version, None, r)
                }
            };
            let verdict = Verdict {
                accepted: result.is_ok(),
                version,
                current_version,
                refusal: result.as_ref().err().map(|e| {
                    e.refusal()
                        .as_str_name()
                        .trim_start_matches("ROOT_REFUSAL_")
                        .to_lowercase()
                }),
                reason: result.as_ref().err().map(ToString::to_string),
            };
            if json {
                print_json(&verdict);
            } else if verdict.accepted {
                match current_version {
                    Some(c) => println!(
                        "accepted: a device holding root version {c} takes root version {version}"
                    ),
                    None => println!("accepted: root version {version} is a valid first root"),
                }
            } else {
                println!(
                    "refused ({}): {}",
                    verdict.refusal.as_deref().unwrap_or("-"),
                    verdict.reason.as_deref().unwrap_or("-")
                );
            }
            Ok(if verdict.accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        TrustCmd::Show { file } => {
            let (signed, root) = read_root(&file)?;
            print_view(&view(&signed, &root, now), json);
            Ok(ExitCode::SUCCESS)
        }
        TrustCmd::Publish { file } => {
            let bytes = read(&file)?;
            let fleet = connect(conn).await?;
            let r = fleet.publish_root(bytes).await?;
            trust_status(&r, json);
            Ok(ExitCode::SUCCESS)
        }
        TrustCmd::Status => {
            let fleet = connect(conn).await?;
            let r = fleet.trust().await?;
            trust_status(&r, json);
            Ok(ExitCode::SUCCESS)
        }
    }
}
