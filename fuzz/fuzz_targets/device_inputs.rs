//! What a device decodes from the network, with the checks that follow, against a fixed root.
//! The first input byte picks the topic the rest arrived on:
//!
//! 0. `devices/{id}/cmd`: `command::verify_command`;
//! 1. `fleet/trust/roots`: `TrustedRoot::walk`;
//! 2. `devices/{id}/update/manifest`: the manifest judge (`TrustedKeys::verify_encoded`, then
//!    `manifest::validate` and `manifest::check_freshness`);
//! 3. a chunk: `wire::decode_chunk_bounded`, then `merkle::verify_chunk` against the fixed
//!    update's component;
//! 4. a withdrawal on the manifest topic: `wire::decode_signed_manifest_bounded`, then
//!    `command::verify_withdrawal`.
//!
//! Beyond "never panics", what each check promises is asserted on what it accepts: only the
//! fixed keys can sign, so anything accepted must carry their signature over exactly the
//! accepted bytes.
#![no_main]

use std::sync::OnceLock;

use fleet_fuzz::{device_root, manifest, DEVICE_CLASS, DEVICE_ID, NOW_MS};
use fleet_proto::command::{verify_command, verify_withdrawal, Recipient};
use fleet_proto::limits::MAX_PROOF_LEN;
use fleet_proto::manifest::{check_freshness, validate, DeviceFacts};
use fleet_proto::signing::TrustedKeys;
use fleet_proto::trust::TrustedRoot;
use fleet_proto::{merkle, v1, wire, Message as _};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};

struct Device {
    root: TrustedRoot,
    updates: TrustedKeys,
    component: v1::Component,
}

fn device() -> &'static Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let root = device_root();
        let updates = root.updates.trusted_keys();
        let component = manifest().components.remove(0);
        Device {
            root,
            updates,
            component,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&topic, payload)) = data.split_first() else {
        return;
    };
    let d = device();
    match topic % 5 {
        0 => {
            let me = Recipient {
                device_id: DEVICE_ID,
                device_class: DEVICE_CLASS,
            };
            match verify_command(Some(&d.root), payload, me, NOW_MS) {
                Ok(v) => {
                    let env =
                        v1::SignedCommand::decode(payload).expect("an accepted command decodes");
                    assert_eq!(v.digest, Sha256::digest(&env.command).to_vec());
                    assert!(
                        v.command.expires_at_ms > NOW_MS,
                        "accepted an expired command"
                    );
                }
                Err(r) => {
                    // What is reported upward stays bounded.
                    assert!(r.detail.len() <= fleet_proto::MAX_DETAIL_LEN);
                    assert!(r.command_id.len() <= fleet_proto::limits::MAX_UPDATE_ID_LEN);
                }
            }
        }
        1 => {
            let walk = d.root.walk(payload, NOW_MS);
            if let Some(next) = &walk.accepted {
                assert!(next.version > d.root.version, "a walk went backwards");
                assert!(!next.expired(NOW_MS), "a walk accepted an expired root");
            }
        }
        2 => {
            if let Ok(v) = d.updates.verify_encoded(payload) {
                let facts = DeviceFacts {
                    device_class: DEVICE_CLASS,
                    installed_sequence: 1,
                    now_ms: NOW_MS,
                };
                if validate(&v.manifest).is_ok() {
                    let _ = check_freshness(&v.manifest, &facts);
                }
            }
        }
        3 => {
            if let Ok(chunk) = wire::decode_chunk_bounded(payload, MAX_PROOF_LEN) {
                assert!(chunk.proof.len() <= MAX_PROOF_LEN);
                assert!(chunk.data.len() <= fleet_proto::chunker::MAX_CHUNK_SIZE as usize);
                if let Ok((offset, digest)) =
                    merkle::verify_chunk(&d.component, chunk.index, &chunk.data, &chunk.proof)
                {
                    // Only the real chunk can prove itself: it is the image's bytes.
                    let image = fleet_fuzz::image();
                    let start = usize::try_from(offset).expect("offset fits");
                    assert_eq!(
                        &image[start..start + chunk.data.len()],
                        chunk.data.as_slice()
                    );
                    assert_eq!(digest, merkle::chunk_digest(&chunk.data));
                }
            }
        }
        _ => {
            if let Ok(signed) = wire::decode_signed_manifest_bounded(payload) {
                if let Ok(w) = verify_withdrawal(Some(&d.root), &signed, NOW_MS) {
                    assert_eq!(w.manifest_sha256.len(), 32);
                }
            }
        }
    }
});
