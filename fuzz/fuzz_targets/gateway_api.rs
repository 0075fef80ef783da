//! What a service sends the gateway on `fleet/api/{service}/request`: `ApiRequest` decoding,
//! then the public checks of the wire contract that the gateway runs on each body (ids,
//! device ids, the manifest's structure, a chunk's proof length, a published root against the
//! gateway's current one).
//!
//! The gateway's own request checks (the size and signature bounds of `CreateUpdate` and
//! `UploadChunk` in its update service) are private to the gateway crate, so they are not
//! reached from here; decoding and everything they build on is.
//!
//! Beyond "never panics": a decoded request re-encodes to bytes that decode to the same
//! request (what the gateway forwards to its services is what it was sent).
#![no_main]

use std::sync::OnceLock;

use fleet_fuzz::{device_root, NOW_MS};
use fleet_proto::ids::validate_id;
use fleet_proto::trust::TrustedRoot;
use fleet_proto::v1::{self, api_request::Body};
use fleet_proto::{manifest, merkle, DeviceId, Message as _};
use libfuzzer_sys::fuzz_target;

fn current_root() -> &'static TrustedRoot {
    static ROOT: OnceLock<TrustedRoot> = OnceLock::new();
    ROOT.get_or_init(device_root)
}

fuzz_target!(|data: &[u8]| {
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
