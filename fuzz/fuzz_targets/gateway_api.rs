//! What a service sends the gateway on `fleet/api/{service}/request`: `ApiRequest` decoding,
//! then the checks the gateway runs on each body: the public ones of the wire contract (ids,
//! device ids, the manifest's structure, a chunk's proof length, a published root against the
//! gateway's current one) and the update service's own bounds on `CreateUpdate` and
//! `UploadChunk` (`check_create`, `check_upload`, through `fleet_broker::fuzzing`).
//!
//! Each input is also read as a bare `UploadChunk` and a bare `SignedManifest`.
//!
//! Beyond "never panics": a decoded request re-encodes to bytes that decode to the same
//! request (what the gateway forwards to its services is what it was sent); a `CreateUpdate`
//! is accepted only with 1 to `MAX_SIGNATURES` bounded signatures and a valid manifest whose
//! images add up, without overflow, to the returned total within the budget; an
//! `UploadChunk` is accepted exactly when its ids are valid, its chunk and proof within their
//! bounds and every proof entry 32 bytes; every refusal's message is bounded.
#![no_main]

use std::sync::OnceLock;

use fleet_broker::fuzzing::{check_create, check_upload};
use fleet_fuzz::{bounded, device_root, NOW_MS};
use fleet_proto::chunker::MAX_CHUNK_SIZE;
use fleet_proto::ids::validate_id;
use fleet_proto::limits::{MAX_KEY_ID_LEN, MAX_PROOF_LEN, MAX_SIGNATURES};
use fleet_proto::trust::TrustedRoot;
use fleet_proto::v1::{self, api_request::Body};
use fleet_proto::{manifest, merkle, DeviceId, Message as _};
use libfuzzer_sys::fuzz_target;

fn current_root() -> &'static TrustedRoot {
    static ROOT: OnceLock<TrustedRoot> = OnceLock::new();
    ROOT.get_or_init(device_root)
}

/// The gateway's default `updates.max_update_bytes` (1 GiB).
const BUDGET: u64 = 1 << 30;

/// The update service's bounds on a `CreateUpdate`: as the service does, the signed manifest
/// is re-encoded and decoded with its manifest, then checked.
fn create(signed: &v1::SignedManifest) {
    let bytes = signed.encode_to_vec();
    let Ok(signed) = v1::SignedManifest::decode(bytes.as_slice()) else {
        return;
    };
    let Ok(m) = v1::UpdateManifest::decode(signed.manifest.as_slice()) else {
        return;
    };
    for budget in [BUDGET, 1] {
        let verdict = check_create(&signed, &m, budget);
        bounded(&verdict);
        let Ok(total) = verdict else {
            continue;
        };
        let n = signed.signatures.len();
        assert!((1..=MAX_SIGNATURES).contains(&n), "{n} signatures accepted");
        for s in &signed.signatures {
            assert!(!s.key_id.is_empty() && s.key_id.len() <= MAX_KEY_ID_LEN);
            assert!(!s.key_id.chars().any(char::is_control));
        }
        assert!(
            manifest::validate(&m).is_ok(),
            "an invalid manifest accepted"
        );
        let sum = m
            .components
            .iter()
            .try_fold(0u64, |sum, c| sum.checked_add(c.size));
        assert_eq!(sum, Some(total));
        assert!(total <= budget);
    }
}

/// The update service's bounds on an `UploadChunk`, against the rule written out.
fn upload(u: &v1::UploadChunk) {
    let verdict = check_upload(u);
    bounded(&verdict);
    let expected = validate_id(&u.update_id).is_ok()
        && validate_id(&u.component).is_ok()
        && u.data.len() <= MAX_CHUNK_SIZE as usize
        && u.proof.len() <= MAX_PROOF_LEN
        && u.proof.iter().all(|h| h.len() == 32);
    assert_eq!(verdict.is_ok(), expected, "upload check");
}

fuzz_target!(|data: &[u8]| {
    // The same bytes as a bare body too: the update service's bounds are reached without the
    // fuzzer having to keep an envelope's lengths consistent.
    if let Ok(u) = v1::UploadChunk::decode(data) {
        upload(&u);
    }
    if let Ok(signed) = v1::SignedManifest::decode(data) {
        create(&signed);
    }
    let Ok(req) = v1::ApiRequest::decode(data) else {
        return;
    };
    let again = v1::ApiRequest::decode(req.encode_to_vec().as_slice())
        .expect("a re-encoded request decodes");
    assert_eq!(again, req, "decode(encode(request)) != request");
    let _ = validate_id(&req.request_id);
    match req.body {
        Some(Body::SendCommand(c)) => {
            let _ = validate_id(&c.command_id);
            for d in &c.device_ids {
                if let Ok(id) = DeviceId::new(d.clone()) {
                    assert_eq!(id.as_str(), d);
                }
            }
            if !c.device_class.is_empty() {
                let _ = validate_id(&c.device_class);
            }
        }
        Some(Body::GetCommand(g)) => {
            let _ = validate_id(&g.command_id);
            let _ = DeviceId::new(g.device_id);
        }
        Some(Body::GetStatus(s)) => {
            for d in s.device_ids {
                let _ = DeviceId::new(d);
            }
        }
        Some(Body::CreateUpdate(c)) => {
            if let Some(signed) = c.manifest {
                create(&signed);
                if let Ok(m) = v1::UpdateManifest::decode(signed.manifest.as_slice()) {
                    if manifest::validate(&m).is_ok() {
                        // A valid manifest's sizes add up without overflow (chunk counts
                        // match the sizes, chunk sizes are bounded).
                        for comp in &m.components {
                            assert!(comp.chunk_count > 0);
                            let _ = merkle::proof_len(comp.chunk_count - 1, comp.chunk_count);
                        }
                    }
                }
            }
        }
        Some(Body::UploadChunk(u)) => {
            upload(&u);
            let _ = validate_id(&u.update_id).and_then(|()| validate_id(&u.component));
            let _ = merkle::proof_len(u.index, u.index.saturating_add(1));
        }
        Some(Body::PublishRoot(p)) => {
            if let Ok(next) = current_root().accept_next(&p.signed_root, NOW_MS) {
                assert!(next.version > current_root().version);
            }
            let _ = TrustedRoot::provisioned(&p.signed_root);
        }
        _ => {}
    }
});
