//! What the `commands` role of the fleet's root signs, and how a device checks it: commands and
//! update withdrawals.
//!
//! A service encodes a [`v1::Command`] once and signs those exact bytes under
//! [`COMMAND_CONTEXT`]; the [`v1::SignedCommand`] carries them unchanged through the gateway's
//! durable store to the device, which runs [`verify_command`] before its command journal sees
//! anything. The gateway adds only the unsigned delivery fields (attempt, submitter).
//!
//! [`verify_command`] refuses, in this order (each a [`v1::CommandRefusal`] reported upward):
//! an envelope over [`MAX_SIGNED_COMMAND_LEN`] or with more than [`MAX_SIGNATURES`] signatures
//! or that does not decode (MALFORMED); no root (NO_ROOT) or an expired root (ROOT_EXPIRED);
//! no signature (UNSIGNED); fewer distinct `commands` keys than the threshold (UNTRUSTED);
//! then, on the authenticated bytes only: a bad id (MALFORMED), another device or class
//! (WRONG_TARGET), no expiry (NO_EXPIRY), expired (EXPIRED), not yet valid (NOT_YET_VALID,
//! allowing [`CLOCK_SKEW_MS`]). Replays of commands the device still remembers are the command
//! journal's business; replays of forgotten ones are refused by the device's issue-time floor.
//!
//! A withdrawal ([`v1::UpdateWithdrawal`]) travels in a [`v1::SignedManifest`] with `manifest`
//! empty, signed under [`WITHDRAWAL_CONTEXT`] by the same role; it names the exact manifest it
//! withdraws by digest.
//!
//! No I/O, no clock: the caller passes `now`.

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::ids::validate_id;
use crate::limits::MAX_SIGNATURES;
use crate::report::bounded_detail;
use crate::signing::{SignError, Signer};
use crate::trust::{Role, TrustError, TrustedRoot};
use crate::v1::{self, CommandRefusal, CommandStatus};

/// Prefix of every signed command message (domain separation).
pub const COMMAND_CONTEXT: &[u8] = b"fleet.v1.Command\0";
/// Prefix of every signed withdrawal message.
pub const WITHDRAWAL_CONTEXT: &[u8] = b"fleet.v1.UpdateWithdrawal\0";
/// Largest encoded SignedCommand a device looks at.
pub const MAX_SIGNED_COMMAND_LEN: usize = 256 * 1024;
/// Largest encoded UpdateWithdrawal looked at.
pub const MAX_WITHDRAWAL_LEN: usize = 4 * 1024;
/// How far ahead of the device's clock a command's not-before time may be and the command still
/// run (clocks of gateway and device differ a little).
pub const CLOCK_SKEW_MS: u64 = 60_000;

/// Signs `command` (encoded once here) with every signer given, in order.
pub fn sign_command(
    command: &v1::Command,
    signers: &[&dyn Signer],
) -> Result<v1::SignedCommand, SignError> {
    let bytes = command.encode_to_vec();
    let signatures = signers
        .iter()
        .map(|s| s.sign_in_context(COMMAND_CONTEXT, &bytes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(v1::SignedCommand {
        command: bytes,
        signatures,
        attempt: 0,
        submitted_by: String::new(),
    })
}

/// The withdrawal of the offer `manifest` (the encoded UpdateManifest bytes, exactly as signed).
pub fn withdrawal_of(
    update_id: &str,
    manifest: &[u8],
    issued_at_ms: u64,
    reason: &str,
) -> v1::UpdateWithdrawal {
    v1::UpdateWithdrawal {
        update_id: update_id.to_owned(),
        manifest_sha256: Sha256::digest(manifest).to_vec(),
        issued_at_ms,
        reason: bounded_detail(reason),
    }
}

/// Signs a withdrawal; the result is published in place of the manifest.
pub fn sign_withdrawal(
    withdrawal: &v1::UpdateWithdrawal,
    signers: &[&dyn Signer],
) -> Result<v1::SignedManifest, SignError> {
    let bytes = withdrawal.encode_to_vec();
    let signatures = signers
        .iter()
        .map(|s| s.sign_in_context(WITHDRAWAL_CONTEXT, &bytes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(v1::SignedManifest {
        manifest: Vec::new(),
        signatures,
        withdrawal: bytes,
    })
}

/// Who is checking a command: the device's id and class.
#[derive(Debug, Clone, Copy)]
pub struct Recipient<'a> {
    /// The device's id (from its certificate).
    pub device_id: &'a str,
    /// The device's class (hardware model); empty: commands to a class never match.
    pub device_class: &'a str,
}

/// A command whose signatures, target and validity period have been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedCommand {
    /// The decoded command (from the signed bytes).
    pub command: v1::Command,
    /// SHA-256 of the signed command bytes (CommandResult.command_digest).
    pub digest: Vec<u8>,
    /// Not signed: the gateway's delivery number.
    pub attempt: u32,
    /// Not signed: the submitting service, as the gateway authenticated it.
    pub submitted_by: String,
}

/// A delivery refused before it ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("command {command_id:?} refused ({refusal:?}): {detail}")]
pub struct Refused {
    /// Why.
    pub refusal: CommandRefusal,
    /// For a human (bounded, printable).
    pub detail: String,
    /// The command id as the delivery states it, if it decodes and is a valid id (it may be a
    /// forgery: only for reporting); empty otherwise.
    pub command_id: String,
    /// SHA-256 of the delivery's command bytes; empty when the envelope did not decode.
    pub digest: Vec<u8>,
}

impl Refused {
    /// The status a refusal is answered with: EXPIRED for an expired command, REJECTED else.
    pub fn status(&self) -> CommandStatus {
        if self.refusal == CommandRefusal::Expired {
            CommandStatus::Expired
        } else {
            CommandStatus::Rejected
        }
    }

    /// The CommandResult that reports this refusal upward.
    pub fn to_result(&self, completed_at_ms: u64) -> v1::CommandResult {
        v1::CommandResult {
            command_id: self.command_id.clone(),
            status: self.status().into(),
            output: Vec::new(),
            message: self.detail.clone(),
            completed_at_ms,
            command_digest: self.digest.clone(),
            refusal: self.refusal.into(),
        }
    }
}

/// Checks a delivery from `devices/{id}/cmd` (the encoded SignedCommand exactly as received)
/// against the device's root (see the module docs for the order of checks).
pub fn verify_command(
    root: Option<&TrustedRoot>,
    delivery: &[u8],
    me: Recipient<'_>,
    now_ms: u64,
) -> Result<VerifiedCommand, Refused> {
    let mut refused = Refused {
        refusal: CommandRefusal::Malformed,
        detail: String::new(),
        command_id: String::new(),
        digest: Vec::new(),
    };
    let fail = |mut r: Refused, refusal: CommandRefusal, detail: String| {
        r.refusal = refusal;
        r.detail = bounded_detail(&detail);
        Err(r)
    };
    if delivery.len() > MAX_SIGNED_COMMAND_LEN {
        let detail = format!(
            "{} bytes; at most {MAX_SIGNED_COMMAND_LEN} are read",
            delivery.len()
        );
        return fail(refused, CommandRefusal::Malformed, detail);
    }
    let env = match v1::SignedCommand::decode(delivery) {
        Ok(env) => env,
        Err(e) => {
            return fail(
                refused,
                CommandRefusal::Malformed,
                format!("not a signed command: {e}"),
            )
        }
    };
    refused.digest = Sha256::digest(&env.command).to_vec();
    // For reporting only: the id as the (unauthenticated) bytes state it, if it is one.
    let unverified = v1::Command::decode(env.command.as_slice()).ok();
    if let Some(c) = &unverified {
        if validate_id(&c.command_id).is_ok() {
            refused.command_id = c.command_id.clone();
        }
    }
    if env.signatures.len() > MAX_SIGNATURES {
        let detail = format!(
            "{} signatures; at most {MAX_SIGNATURES}",
            env.signatures.len()
        );
        return fail(refused, CommandRefusal::Malformed, detail);
    }
    let Some(root) = root else {
        return fail(
            refused,
            CommandRefusal::NoRoot,
            "the device holds no root of trust".into(),
        );
    };
    if root.expired(now_ms) {
        let detail = format!(
            "the device's root (version {}) expired at {} ms",
            root.version, root.expires_at_ms
        );
        return fail(refused, CommandRefusal::RootExpired, detail);
    }
    if env.signatures.is_empty() {
        return fail(
            refused,
            CommandRefusal::Unsigned,
            "the command is not signed".into(),
        );
    }
    if let Err(e) = root.commands.check(
        Role::Commands,
        COMMAND_CONTEXT,
        &env.command,
        &env.signatures,
    ) {
        let detail = match e {
            TrustError::Threshold {
                valid, threshold, ..
            } => format!(
                "{valid} valid signature(s) by the commands keys of root version {}, {threshold} needed",
                root.version
            ),
            other => other.to_string(),
        };
        return fail(refused, CommandRefusal::Untrusted, detail);
    }
    let Some(command) = unverified else {
        return fail(
            refused,
            CommandRefusal::Malformed,
            "the signed bytes are not a command".into(),
        );
    };
    if let Err(e) = validate_id(&command.command_id) {
        return fail(
            refused,
            CommandRefusal::Malformed,
            format!("command id: {e}"),
        );
    }
    let target_ok = match (
        command.device_id.is_empty(),
        command.device_class.is_empty(),
    ) {
        (false, true) => command.device_id == me.device_id,
        (true, false) => !me.device_class.is_empty() && command.device_class == me.device_class,
        _ => {
            let detail = "the command must name exactly one of a device and a class".to_owned();
            return fail(refused, CommandRefusal::Malformed, detail);
        }
    };
    if !target_ok {
        let detail = if command.device_id.is_empty() {
            format!(
                "addressed to class {:?}, not {:?}",
                command.device_class, me.device_class
            )
        } else {
            format!(
                "addressed to device {:?}, not {:?}",
                command.device_id, me.device_id
            )
        };
        return fail(refused, CommandRefusal::WrongTarget, detail);
    }
    if command.expires_at_ms == 0 {
        return fail(
            refused,
            CommandRefusal::NoExpiry,
            "a signed command must expire".into(),
        );
    }
    if now_ms >= command.expires_at_ms {
        let detail = format!("expired at {} ms (now {now_ms} ms)", command.expires_at_ms);
        return fail(refused, CommandRefusal::Expired, detail);
    }
    if command.not_before_ms > now_ms.saturating_add(CLOCK_SKEW_MS) {
        let detail = format!(
            "not valid before {} ms (now {now_ms} ms)",
            command.not_before_ms
        );
        return fail(refused, CommandRefusal::NotYetValid, detail);
    }
    Ok(VerifiedCommand {
        command,
        digest: refused.digest,
        attempt: env.attempt,
        submitted_by: env.submitted_by,
    })
}

/// Why a withdrawal is not acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WithdrawalError {
    /// Not a withdrawal envelope, over a bound, or the signed bytes are not a withdrawal.
    #[error("not a well-formed withdrawal: {0}")]
    Malformed(String),
    /// The device holds no root, or its root has expired.
    #[error("no valid root of trust to check a withdrawal against")]
    NoRoot,
    /// Fewer distinct `commands` keys signed it than the threshold.
    #[error("withdrawal not signed by the commands role: {0}")]
    Untrusted(TrustError),
}

/// Checks a signed withdrawal (a SignedManifest with `withdrawal` set) against the root: the
/// caller then acts on it only if `manifest_sha256` is the digest of the offer it holds.
pub fn verify_withdrawal(
    root: Option<&TrustedRoot>,
    signed: &v1::SignedManifest,
    now_ms: u64,
) -> Result<v1::UpdateWithdrawal, WithdrawalError> {
    if !signed.manifest.is_empty() || signed.withdrawal.is_empty() {
        return Err(WithdrawalError::Malformed(
            "a withdrawal carries a withdrawal and no manifest".into(),
        ));
    }
    if signed.withdrawal.len() > MAX_WITHDRAWAL_LEN || signed.signatures.len() > MAX_SIGNATURES {
        return Err(WithdrawalError::Malformed(format!(
            "over the bounds ({MAX_WITHDRAWAL_LEN} bytes, {MAX_SIGNATURES} signatures)"
        )));
    }
    let root = root
        .filter(|r| !r.expired(now_ms))
        .ok_or(WithdrawalError::NoRoot)?;
    root.commands
        .check(
            Role::Commands,
            WITHDRAWAL_CONTEXT,
            &signed.withdrawal,
            &signed.signatures,
        )
        .map_err(WithdrawalError::Untrusted)?;
    let w = v1::UpdateWithdrawal::decode(signed.withdrawal.as_slice())
        .map_err(|e| WithdrawalError::Malformed(e.to_string()))?;
    if validate_id(&w.update_id).is_err() || w.manifest_sha256.len() != 32 {
        return Err(WithdrawalError::Malformed(
            "a withdrawal names an update id and a 32-byte manifest digest".into(),
        ));
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::signing::UpdateSigner;
    use crate::trust::build;

    struct Fleet {
        root_keys: Vec<UpdateSigner>,
        commands: Vec<UpdateSigner>,
        root: TrustedRoot,
    }

    fn fleet(threshold: u32) -> Fleet {
        let root_keys = vec![UpdateSigner::generate()];
        let commands = vec![UpdateSigner::generate(), UpdateSigner::generate()];
        let vk = |s: &[UpdateSigner]| {
            s.iter()
                .map(UpdateSigner::verifying_key)
                .collect::<Vec<_>>()
        };
        let r = v1::Root {
            format_version: crate::trust::ROOT_FORMAT_VERSION,
            version: 1,
            expires_at_ms: 1_000_000,
            root: Some(build::role(&vk(&root_keys), 1)),
            updates: Some(build::role(&vk(&root_keys), 1)),
            commands: Some(build::role(&vk(&commands), threshold)),
        };
        let mut signed = build::encode(&r);
        build::add_signature(&root_keys[0], &mut signed).unwrap();
        let root = TrustedRoot::provisioned(&signed.encode_to_vec()).unwrap();
        Fleet {
            root_keys,
            commands,
            root,
        }
    }

    fn command(device: &str) -> v1::Command {
        v1::Command {
            command_id: "c-1".into(),
            name: "reboot".into(),
            payload: b"now".to_vec(),
            issued_at_ms: 10,
            expires_at_ms: 1_000,
            issued_by: "svc".into(),
            device_id: device.into(),
            device_class: String::new(),
            not_before_ms: 0,
        }
    }

    const ME: Recipient<'static> = Recipient {
        device_id: "dev-0001",
        device_class: "pump",
    };

    fn refusal(r: Result<VerifiedCommand, Refused>) -> CommandRefusal {
        r.unwrap_err().refusal
    }

    #[test]
    fn a_command_signed_by_the_commands_role_for_this_device_passes() {
        let f = fleet(1);
        let mut s = sign_command(&command("dev-0001"), &[&f.commands[0]]).unwrap();
        s.attempt = 3;
        let v = verify_command(Some(&f.root), &s.encode_to_vec(), ME, 100).unwrap();
        assert_eq!(v.command, command("dev-0001"));
        assert_eq!(v.attempt, 3);
        assert_eq!(v.digest, Sha256::digest(&s.command).to_vec());
        // To its class too.
        let mut c = command("");
        c.device_class = "pump".into();
        let s = sign_command(&c, &[&f.commands[1]]).unwrap();
        assert!(verify_command(Some(&f.root), &s.encode_to_vec(), ME, 100).is_ok());
    }

    #[test]
    fn every_refusal_has_its_reason_and_keeps_the_id_for_reporting() {
        let f = fleet(2);
        let both: [&dyn Signer; 2] = [&f.commands[0], &f.commands[1]];
        let ok = |c: &v1::Command| sign_command(c, &both).unwrap().encode_to_vec();
        assert!(verify_command(Some(&f.root), &ok(&command("dev-0001")), ME, 100).is_ok());
        // Unsigned.
        let mut unsigned = sign_command(&command("dev-0001"), &both).unwrap();
        unsigned.signatures.clear();
        let r = verify_command(Some(&f.root), &unsigned.encode_to_vec(), ME, 100).unwrap_err();
        assert_eq!(r.refusal, CommandRefusal::Unsigned);
        assert_eq!(r.command_id, "c-1");
        assert_eq!(r.to_result(5).status, CommandStatus::Rejected as i32);
        // Below the threshold; by a key the root does not name (a root key is no command key).
        let one = sign_command(&command("dev-0001"), &[&f.commands[0]]).unwrap();
        assert_eq!(
            refusal(verify_command(Some(&f.root), &one.encode_to_vec(), ME, 100)),
            CommandRefusal::Untrusted
        );
        let stranger =
            sign_command(&command("dev-0001"), &[&f.root_keys[0], &f.commands[0]]).unwrap();
        assert_eq!(
            refusal(verify_command(
                Some(&f.root),
                &stranger.encode_to_vec(),
                ME,
                100
            )),
            CommandRefusal::Untrusted
        );
        // Signed by the same key twice counts once.
        let mut twice = one.clone();
        twice.signatures.push(one.signatures[0].clone());
        assert_eq!(
            refusal(verify_command(
                Some(&f.root),
                &twice.encode_to_vec(),
                ME,
                100
            )),
            CommandRefusal::Untrusted
        );
        // A signature over the command does not carry over to other bytes.
        let mut tampered = sign_command(&command("dev-0001"), &both).unwrap();
        tampered.command = command("dev-0002").encode_to_vec();
        assert_eq!(
            refusal(verify_command(
                Some(&f.root),
                &tampered.encode_to_vec(),
                ME,
                100
            )),
            CommandRefusal::Untrusted
        );
        // Another device; another class; both or neither target.
        assert_eq!(
            refusal(verify_command(
                Some(&f.root),
                &ok(&command("dev-0002")),
                ME,
                100
            )),
            CommandRefusal::WrongTarget
        );
        let mut c = command("");
        c.device_class = "valve".into();
        assert_eq!(
            refusal(verify_command(Some(&f.root), &ok(&c), ME, 100)),
            CommandRefusal::WrongTarget
        );
        c.device_id = "dev-0001".into();
        assert_eq!(
            refusal(verify_command(Some(&f.root), &ok(&c), ME, 100)),
            CommandRefusal::Malformed
        );
        // Expired, no expiry, not yet valid (within the skew it runs).
        let r = verify_command(Some(&f.root), &ok(&command("dev-0001")), ME, 1_000).unwrap_err();
        assert_eq!(
            (r.refusal, r.status()),
            (CommandRefusal::Expired, CommandStatus::Expired)
        );
        let mut c = command("dev-0001");
        c.expires_at_ms = 0;
        assert_eq!(
            refusal(verify_command(Some(&f.root), &ok(&c), ME, 100)),
            CommandRefusal::NoExpiry
        );
        let mut c = command("dev-0001");
        c.expires_at_ms = 10_000_000;
        c.not_before_ms = 100 + CLOCK_SKEW_MS + 1;
        assert_eq!(
            refusal(verify_command(Some(&f.root), &ok(&c), ME, 100)),
            CommandRefusal::NotYetValid
        );
        c.not_before_ms = 100 + CLOCK_SKEW_MS;
        assert!(verify_command(Some(&f.root), &ok(&c), ME, 100).is_ok());
        // No root; an expired root.
        assert_eq!(
            refusal(verify_command(None, &ok(&command("dev-0001")), ME, 100)),
            CommandRefusal::NoRoot
        );
        let mut c = command("dev-0001");
        c.expires_at_ms = 2_000_000;
        assert_eq!(
            refusal(verify_command(Some(&f.root), &ok(&c), ME, 1_000_000)),
            CommandRefusal::RootExpired
        );
        // Garbage and oversize.
        let r = verify_command(Some(&f.root), &[0xff, 0xff], ME, 100).unwrap_err();
        assert_eq!(
            (r.refusal, r.command_id.as_str(), r.digest.len()),
            (CommandRefusal::Malformed, "", 0)
        );
        let big = vec![0u8; MAX_SIGNED_COMMAND_LEN + 1];
        assert_eq!(
            refusal(verify_command(Some(&f.root), &big, ME, 100)),
            CommandRefusal::Malformed
        );
    }

    #[test]
    fn withdrawals_need_the_commands_role_and_name_one_manifest() {
        let f = fleet(1);
        let w = withdrawal_of("upd-1", b"manifest bytes", 5, "abort");
        let signed = sign_withdrawal(&w, &[&f.commands[1]]).unwrap();
        assert_eq!(verify_withdrawal(Some(&f.root), &signed, 10).unwrap(), w);
        assert_eq!(
            w.manifest_sha256,
            Sha256::digest(b"manifest bytes").to_vec()
        );
        // An updates (here: root) key is not a commands key.
        let wrong = sign_withdrawal(&w, &[&f.root_keys[0]]).unwrap();
        assert!(matches!(
            verify_withdrawal(Some(&f.root), &wrong, 10),
            Err(WithdrawalError::Untrusted(_))
        ));
        // Unsigned, empty (the old "empty retained message"), no root, expired root.
        let mut unsigned = signed.clone();
        unsigned.signatures.clear();
        assert!(verify_withdrawal(Some(&f.root), &unsigned, 10).is_err());
        assert!(matches!(
            verify_withdrawal(Some(&f.root), &v1::SignedManifest::default(), 10),
            Err(WithdrawalError::Malformed(_))
        ));
        assert_eq!(
            verify_withdrawal(None, &signed, 10),
            Err(WithdrawalError::NoRoot)
        );
        assert_eq!(
            verify_withdrawal(Some(&f.root), &signed, 1_000_000),
            Err(WithdrawalError::NoRoot)
        );
        // A command signature is no withdrawal signature (domain separation).
        let mut cross = signed.clone();
        cross.signatures = vec![f.commands[1].sign_in_context(COMMAND_CONTEXT, &signed.withdrawal)];
        assert!(matches!(
            verify_withdrawal(Some(&f.root), &cross, 10),
            Err(WithdrawalError::Untrusted(_))
        ));
    }
}
