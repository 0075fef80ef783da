//! Signed commands and withdrawals: what the SDK builds and signs with the service's `commands`
//! role key(s) before anything goes to the gateway (which holds no signing key and cannot
//! forge either).
//!
//! A [`SendCommand`] in its unsigned shape (targets, name, payload, ttl) is turned into one
//! [`v1::Command`] per target device id (and one for the class, if a class is named), each
//! encoded once and signed with every configured signer
//! ([`fleet_proto::command::sign_command`]); the request sent is `SendCommand{command_id,
//! signed}`.

use std::sync::Arc;
use std::time::Duration;

use fleet_proto::command::{sign_command, sign_withdrawal};
use fleet_proto::ids::validate_id;
use fleet_proto::signing::Signer;
use fleet_proto::v1::{self, SendCommand, SignedManifest};
use rand_core::RngCore;

use crate::error::SdkError;

/// Lifetime of a signed command whose `SendCommand.ttl_ms` is 0: one hour, the gateway's
/// default for unsigned commands too. A signed command must expire (devices refuse one that
/// does not), and a short life bounds how long a captured command could be replayed.
pub const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(3600);

/// When and by whom a command is signed.
pub(crate) struct Issue<'a> {
    /// Signs it (a threshold of the `commands` role; several for a threshold above one).
    pub(crate) signers: &'a [Arc<dyn Signer>],
    /// Command.issued_by: the service id.
    pub(crate) issued_by: &'a str,
    /// Now, ms since 1970 (Command.issued_at_ms).
    pub(crate) now_ms: u64,
    /// Command.not_before_ms (0: none).
    pub(crate) not_before_ms: u64,
}

/// A fresh command id: `c-` and 16 random hex digits.
pub(crate) fn new_command_id() -> String {
    let mut b = [0u8; 8];
    rand_core::OsRng.fill_bytes(&mut b);
    format!("c-{}", hex::encode(b))
}

/// The request that carries `req` signed: `SendCommand{command_id, signed}`, one SignedCommand
/// per distinct device id of `req` and one for its class, all with the same command id (`req`'s, or a
/// fresh one). A request that is already signed (only `command_id` and `signed` set) is
/// returned unchanged: it was signed elsewhere (offline, or by another tool).
pub(crate) fn signed_request(
    req: &SendCommand,
    issue: &Issue<'_>,
) -> Result<SendCommand, SdkError> {
    let unsigned_fields = !req.device_ids.is_empty()
        || !req.device_class.is_empty()
        || !req.name.is_empty()
        || !req.payload.is_empty()
        || req.ttl_ms != 0;
    if !req.signed.is_empty() {
        if unsigned_fields {
            return Err(SdkError::Invalid(
                "a signed request carries only command_id and signed".into(),
            ));
        }
        return Ok(req.clone());
    }
    if issue.signers.is_empty() {
        return Err(SdkError::NoCommandKey);
    }
    if req.device_ids.is_empty() && req.device_class.is_empty() {
        return Err(SdkError::Invalid(
            "a command needs a target: device ids or a device class".into(),
        ));
    }
    for id in &req.device_ids {
        validate_id(id).map_err(|e| SdkError::Invalid(format!("device id {id:?}: {e}")))?;
    }
    if !req.device_class.is_empty() {
        validate_id(&req.device_class)
            .map_err(|e| SdkError::Invalid(format!("device class {:?}: {e}", req.device_class)))?;
    }
    let command_id = if req.command_id.is_empty() {
        new_command_id()
    } else {
        validate_id(&req.command_id)
            .map_err(|e| SdkError::Invalid(format!("command id {:?}: {e}", req.command_id)))?;
        req.command_id.clone()
    };
    let ttl_ms = if req.ttl_ms == 0 {
        u64::try_from(DEFAULT_COMMAND_TTL.as_millis()).unwrap_or(u64::MAX)
    } else {
        req.ttl_ms
    };
    let expires_at_ms = issue.now_ms.saturating_add(ttl_ms);
    if issue.not_before_ms >= expires_at_ms {
        return Err(SdkError::Invalid(format!(
            "not before {} ms is not before the expiry {expires_at_ms} ms (raise the ttl)",
            issue.not_before_ms
        )));
    }
    let signers: Vec<&dyn Signer> = issue.signers.iter().map(|s| s.as_ref()).collect();
    let base = v1::Command {
        command_id: command_id.clone(),
        name: req.name.clone(),
        payload: req.payload.clone(),
        issued_at_ms: issue.now_ms,
        expires_at_ms,
        issued_by: issue.issued_by.to_owned(),
        device_id: String::new(),
        device_class: String::new(),
        not_before_ms: issue.not_before_ms,
    };
    // A device named twice gets one command (the gateway would see two under one id).
    let mut seen = std::collections::BTreeSet::new();
    let targets = req
        .device_ids
        .iter()
        .filter(|id| seen.insert(id.as_str()))
        .map(|id| (id.clone(), String::new()))
        .chain((!req.device_class.is_empty()).then(|| (String::new(), req.device_class.clone())));
    let mut signed = Vec::with_capacity(req.device_ids.len() + 1);
    for (device_id, device_class) in targets {
        let command = v1::Command {
            device_id,
            device_class,
            ..base.clone()
        };
        signed.push(sign_command(&command, &signers).map_err(SdkError::Sign)?);
    }
    Ok(SendCommand {
        command_id,
        signed,
        ..SendCommand::default()
    })
}

/// The signed withdrawal of the offer whose manifest bytes have SHA-256 `manifest_sha256` (as
/// `UpdateRecord.manifest_sha256` states it).
pub(crate) fn signed_withdrawal(
    update_id: &str,
    manifest_sha256: &[u8],
    reason: &str,
    signers: &[Arc<dyn Signer>],
    now_ms: u64,
) -> Result<SignedManifest, SdkError> {
    if signers.is_empty() {
        return Err(SdkError::NoCommandKey);
    }
    if manifest_sha256.is_empty() {
        return Err(SdkError::Protocol(format!(
            "the gateway states no manifest digest for update {update_id:?}, so no withdrawal can name it (a gateway without signed withdrawals?)"
        )));
    }
    if manifest_sha256.len() != 32 {
        return Err(SdkError::Protocol(format!(
            "the gateway states a manifest digest of {} bytes for update {update_id:?}; 32 expected",
            manifest_sha256.len()
        )));
    }
    let withdrawal = v1::UpdateWithdrawal {
        update_id: update_id.to_owned(),
        manifest_sha256: manifest_sha256.to_vec(),
        issued_at_ms: now_ms,
        reason: fleet_proto::bounded_detail(reason),
    };
    let signers: Vec<&dyn Signer> = signers.iter().map(|s| s.as_ref()).collect();
    sign_withdrawal(&withdrawal, &signers).map_err(SdkError::Sign)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::command::{verify_command, verify_withdrawal, withdrawal_of, Recipient};
    use fleet_proto::signing::UpdateSigner;
    use fleet_proto::trust::{build, TrustedRoot, ROOT_FORMAT_VERSION};
    use fleet_proto::v1::CommandRefusal;
    use fleet_proto::Message as _;

    const NOW: u64 = 1_000_000;

    /// A root whose `commands` role is `commands` with `threshold`.
    fn fleet_root(commands: &[&UpdateSigner], threshold: u32) -> TrustedRoot {
        let root_key = UpdateSigner::generate();
        let vk: Vec<_> = commands.iter().map(|s| s.verifying_key()).collect();
        let r = v1::Root {
            format_version: ROOT_FORMAT_VERSION,
            version: 1,
            expires_at_ms: NOW * 10,
            root: Some(build::role(&[root_key.verifying_key()], 1)),
            updates: Some(build::role(&[root_key.verifying_key()], 1)),
            commands: Some(build::role(&vk, threshold)),
        };
        let mut signed = build::encode(&r);
        build::add_signature(&root_key, &mut signed).unwrap();
        TrustedRoot::provisioned(&signed.encode_to_vec()).unwrap()
    }

    /// What the gateway hands the device: the stored SignedCommand with its delivery fields.
    fn delivered(s: &v1::SignedCommand) -> Vec<u8> {
        let mut d = s.clone();
        d.attempt = 3;
        d.submitted_by = "svc-0001".into();
        d.encode_to_vec()
    }

    fn me(id: &'static str, class: &'static str) -> Recipient<'static> {
        Recipient {
            device_id: id,
            device_class: class,
        }
    }

    #[test]
    fn a_sent_command_is_what_the_device_verifies_and_runs() {
        let key = UpdateSigner::generate();
        let root = fleet_root(&[&key], 1);
        let signers: Vec<Arc<dyn Signer>> = vec![Arc::new(
            UpdateSigner::from_pkcs8_pem(&key.to_pkcs8_pem().unwrap()).unwrap(),
        )];
        let req = SendCommand {
            device_ids: vec!["dev-0001".into(), "dev-0002".into(), "dev-0001".into()],
            device_class: "sensor".into(),
            name: "reboot".into(),
            payload: b"now".to_vec(),
            ..SendCommand::default()
        };
        let issue = Issue {
            signers: &signers,
            issued_by: "svc-0001",
            now_ms: NOW,
            not_before_ms: 0,
        };
        let sent = signed_request(&req, &issue).unwrap();
        // Only the signed shape goes to the gateway.
        assert!(sent.device_ids.is_empty() && sent.name.is_empty() && sent.ttl_ms == 0);
        assert!(sent.command_id.starts_with("c-"), "{}", sent.command_id);
        assert_eq!(sent.signed.len(), 3);
        let v = verify_command(
            Some(&root),
            &delivered(&sent.signed[0]),
            me("dev-0001", ""),
            NOW,
        )
        .unwrap();
        assert_eq!(v.command.command_id, sent.command_id);
        assert_eq!(
            (v.command.name.as_str(), v.command.payload.as_slice()),
            ("reboot", &b"now"[..])
        );
        assert_eq!(v.command.issued_by, "svc-0001");
        assert_eq!(v.command.issued_at_ms, NOW);
        assert_eq!(v.command.expires_at_ms, NOW + 3_600_000, "the default ttl");
        // Each is bound to its own device: dev-0001's command is refused by dev-0002.
        let e = verify_command(
            Some(&root),
            &delivered(&sent.signed[0]),
            me("dev-0002", ""),
            NOW,
        )
        .unwrap_err();
        assert_eq!(e.refusal, CommandRefusal::WrongTarget);
        verify_command(
            Some(&root),
            &delivered(&sent.signed[1]),
            me("dev-0002", ""),
            NOW,
        )
        .unwrap();
        // The class one runs on any device of the class.
        let v = verify_command(
            Some(&root),
            &delivered(&sent.signed[2]),
            me("dev-0042", "sensor"),
            NOW,
        )
        .unwrap();
        assert_eq!(v.command.device_class, "sensor");
        // Expired after the ttl.
        let e = verify_command(
            Some(&root),
            &delivered(&sent.signed[0]),
            me("dev-0001", ""),
            NOW + 3_600_000,
        )
        .unwrap_err();
        assert_eq!(e.refusal, CommandRefusal::Expired);
        // A key the root does not name: untrusted.
        let other = fleet_root(&[&UpdateSigner::generate()], 1);
        let e = verify_command(
            Some(&other),
            &delivered(&sent.signed[0]),
            me("dev-0001", ""),
            NOW,
        )
        .unwrap_err();
        assert_eq!(e.refusal, CommandRefusal::Untrusted);
    }

    #[test]
    fn ttl_not_before_and_a_threshold_of_two_signers() {
        let keys = [UpdateSigner::generate(), UpdateSigner::generate()];
        let root = fleet_root(&[&keys[0], &keys[1]], 2);
        let one: Vec<Arc<dyn Signer>> = vec![Arc::new(
            UpdateSigner::from_pkcs8_pem(&keys[0].to_pkcs8_pem().unwrap()).unwrap(),
        )];
        let two: Vec<Arc<dyn Signer>> = keys
            .iter()
            .map(|k| {
                Arc::new(UpdateSigner::from_pkcs8_pem(&k.to_pkcs8_pem().unwrap()).unwrap())
                    as Arc<dyn Signer>
            })
            .collect();
        let req = SendCommand {
            command_id: "my-id".into(),
            device_ids: vec!["dev-0001".into()],
            name: "x".into(),
            ttl_ms: 300_000,
            ..SendCommand::default()
        };
        let issue = |signers, not_before_ms| Issue {
            signers,
            issued_by: "svc-0001",
            now_ms: NOW,
            not_before_ms,
        };
        let sent = signed_request(&req, &issue(&two, NOW + 120_000)).unwrap();
        assert_eq!(sent.command_id, "my-id");
        let bytes = delivered(&sent.signed[0]);
        let e = verify_command(Some(&root), &bytes, me("dev-0001", ""), NOW).unwrap_err();
        assert_eq!(e.refusal, CommandRefusal::NotYetValid);
        let v = verify_command(Some(&root), &bytes, me("dev-0001", ""), NOW + 120_000).unwrap();
        assert_eq!(v.command.expires_at_ms, NOW + 300_000);
        // One signer where the role needs two: untrusted.
        let sent = signed_request(&req, &issue(&one, 0)).unwrap();
        let e = verify_command(
            Some(&root),
            &delivered(&sent.signed[0]),
            me("dev-0001", ""),
            NOW,
        )
        .unwrap_err();
        assert_eq!(e.refusal, CommandRefusal::Untrusted);
        // A not-before at or after the expiry is refused here.
        assert!(matches!(
            signed_request(&req, &issue(&two, NOW + 300_000)),
            Err(SdkError::Invalid(_))
        ));
    }

    #[test]
    fn without_a_key_nothing_is_sent_unsigned() {
        let req = SendCommand {
            device_ids: vec!["dev-0001".into()],
            name: "x".into(),
            ..SendCommand::default()
        };
        let issue = Issue {
            signers: &[],
            issued_by: "svc-0001",
            now_ms: NOW,
            not_before_ms: 0,
        };
        let e = signed_request(&req, &issue).unwrap_err();
        assert!(matches!(e, SdkError::NoCommandKey), "{e}");
        assert!(e.to_string().contains("command_key_file"), "{e}");
        assert!(matches!(
            signed_withdrawal("u-1", &[0; 32], "", &[], NOW),
            Err(SdkError::NoCommandKey)
        ));
        // A bad target is said before anything is signed.
        let key: Vec<Arc<dyn Signer>> = vec![Arc::new(UpdateSigner::generate())];
        let bad = SendCommand {
            device_ids: vec!["a/b".into()],
            ..req
        };
        let e = signed_request(
            &bad,
            &Issue {
                signers: &key,
                ..issue
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("device id"), "{e}");
    }

    #[test]
    fn a_withdrawal_names_the_offer_the_device_holds() {
        let key = UpdateSigner::generate();
        let root = fleet_root(&[&key], 1);
        let manifest = b"the manifest bytes".to_vec();
        let digest = withdrawal_of("u-1", &manifest, 0, "").manifest_sha256;
        let signers: Vec<Arc<dyn Signer>> = vec![Arc::new(
            UpdateSigner::from_pkcs8_pem(&key.to_pkcs8_pem().unwrap()).unwrap(),
        )];
        let signed = signed_withdrawal("u-1", &digest, "bad batch", &signers, NOW).unwrap();
        let w = verify_withdrawal(Some(&root), &signed, NOW).unwrap();
        assert_eq!(
            (w.update_id.as_str(), w.manifest_sha256, w.reason.as_str()),
            ("u-1", digest, "bad batch")
        );
        for bad in [&[1u8; 5][..], &[]] {
            assert!(matches!(
                signed_withdrawal("u-1", bad, "", &signers, NOW),
                Err(SdkError::Protocol(_))
            ));
        }
    }
}
