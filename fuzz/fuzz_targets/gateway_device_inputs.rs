//! Every message a device publishes to the gateway, through the gateway's own decoding and
//! checks (`fleet_broker::fuzzing`, which calls the services' functions). The first byte picks
//! the message:
//!
//! 0. `devices/{id}/status`: the status owner's `status_item` (device id, decode, a sequence);
//! 1. `devices/{id}/presence`: the registry's `presence_item` (topic, decode, a state);
//! 2. `devices/{id}/cmd/result`: decode and a closing status (the command service);
//! 3. `devices/{id}/update/progress`: decode, a phase, free text bounded (the update
//!    service);
//! 4. `devices/{id}/update/get`: decode, ids, the window within the settings, and the chunk
//!    indexes the update service queues for the device (`queue::wanted`);
//! 5. `devices/{id}/trust`: the trust service's bounded read and its "behind" rule.
//!
//! Beyond "never panics": each verdict agrees with the rule the gateway documents, written
//! out here from the messages' public types; every refusal's message (what a rate-limited log
//! line would carry) is bounded; the chunk indexes are bounded by the window, ascending,
//! below the chunk count, and exactly the lowest the request names.
#![no_main]

use fleet_broker::fuzzing::{self, MAX_RANGES, MAX_TRUST_REPORT_LEN};
use fleet_fuzz::{bounded, NOW_MS};
use fleet_proto::ids::validate_id;
use fleet_proto::topics::{self, DeviceTopic, Topic};
use fleet_proto::v1::{
    ChunkRequest, CommandResult, CommandStatus, Presence, PresenceState, StatusReport, TrustReport,
    UpdateProgress,
};
use fleet_proto::{DeviceId, Message as _, MAX_DETAIL_LEN};
use libfuzzer_sys::fuzz_target;

/// Device ids and topics the status and presence checks are given: valid and invalid.
const DEVICES: [&str; 4] = ["dev-1", "", "a/b", "dev-1/../x"];
const PRESENCE_TOPICS: [&str; 4] = [
    "devices/dev-1/presence",
    "devices/dev-1/status",
    "devices//presence",
    "fleet/api/x/request",
];

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = bytes.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

/// The chunk indexes below `count` that `req` names, ascending, at most `window` of them
/// (by enumeration: only for small counts).
fn named(req: &ChunkRequest, count: u32, window: u32) -> Vec<u32> {
    (0..count)
        .filter(|&i| {
            let in_range = req.ranges.iter().any(|r| r.start <= i && i < r.end);
            let in_bitmap = i
                .checked_sub(req.bitmap_offset)
                .and_then(|k| {
                    let byte = req.bitmap.get(usize::try_from(k / 8).ok()?)?;
                    Some(byte & (1 << (k % 8)) != 0)
                })
                .unwrap_or(false);
            in_range || in_bitmap
        })
        .take(window as usize)
        .collect()
}

fn chunk_request(params: &[u8], payload: &[u8]) {
    // The count from the input (small ones often, for the exact reference); the windows as
    // the configuration allows them: 1 <= default <= max <= 256.
    let count = match params.first().copied().unwrap_or(0) % 4 {
        0 => u32::from(params.get(1).copied().unwrap_or(0)),
        1 => u32_at(params, 1) % 4096,
        _ => u32_at(params, 1),
    };
    let default = 1 + u32::from(params.get(5).copied().unwrap_or(0));
    let max = default.max(1 + u32::from(params.get(6).copied().unwrap_or(0)));
    let verdict = fuzzing::chunk_request(payload, count, default, max);
    bounded(&verdict);
    let Ok(req) = ChunkRequest::decode(payload) else {
        assert!(
            verdict.is_err(),
            "a chunk request that does not decode was accepted"
        );
        return;
    };
    let ids_ok = validate_id(&req.update_id).is_ok() && validate_id(&req.component).is_ok();
    let bitmap_ok = req.bitmap.len() <= count.div_ceil(8) as usize;
    let shape_ok = req.ranges.len() <= MAX_RANGES && bitmap_ok;
    assert_eq!(
        verdict.is_ok(),
        ids_ok && shape_ok,
        "{req:?} for {count} chunks"
    );
    let Ok((decoded, wanted)) = verdict else {
        return;
    };
    assert_eq!(decoded, req);
    let window = match req.window {
        0 => default,
        w => w.min(max),
    };
    assert!(
        wanted.len() <= window as usize,
        "{} indexes over a window of {window}",
        wanted.len()
    );
    assert!(
        wanted.windows(2).all(|w| w[0] < w[1]),
        "not ascending: {wanted:?}"
    );
    assert!(
        wanted.iter().all(|&i| i < count),
        "index past {count}: {wanted:?}"
    );
    if count <= 4096 {
        assert_eq!(
            wanted,
            named(&req, count, window),
            "{req:?} for {count} chunks"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 6 {
        0 => {
            let Some((&d, payload)) = rest.split_first() else {
                return;
            };
            let device = DEVICES[usize::from(d % 4)];
            let verdict = fuzzing::status_report(device, payload);
            bounded(&verdict);
            let expected = DeviceId::new(device).is_ok()
                && StatusReport::decode(payload).is_ok_and(|r| r.sequence != 0);
            assert_eq!(verdict.is_ok(), expected, "status report from {device:?}");
        }
        1 => {
            let Some((&t, payload)) = rest.split_first() else {
                return;
            };
            let topic = PRESENCE_TOPICS[usize::from(t % 4)];
            let verdict = fuzzing::presence(topic, payload);
            bounded(&verdict);
            let on_topic = matches!(
                topics::parse(topic),
                Ok(Topic::Device {
                    kind: DeviceTopic::Presence,
                    ..
                })
            );
            let expected = on_topic
                && Presence::decode(payload).is_ok_and(|p| {
                    p.state == PresenceState::Online as i32
                        || p.state == PresenceState::Offline as i32
                });
            assert_eq!(verdict.is_ok(), expected, "presence on {topic:?}");
        }
        2 => {
            let verdict = fuzzing::command_result(rest);
            bounded(&verdict);
            let decoded = CommandResult::decode(rest);
            let expected = decoded.as_ref().is_ok_and(|r| {
                CommandStatus::try_from(r.status).is_ok_and(|s| s != CommandStatus::Unspecified)
            });
            assert_eq!(verdict.is_ok(), expected, "command result");
            if let (Ok(r), Ok(d)) = (verdict, decoded) {
                assert_eq!(r, d);
            }
        }
        3 => {
            let verdict = fuzzing::update_progress(rest);
            bounded(&verdict);
            let decoded = UpdateProgress::decode(rest);
            assert_eq!(
                verdict.is_ok(),
                decoded.as_ref().is_ok_and(|p| p.phase != 0),
                "update progress"
            );
            if let (Ok(p), Ok(d)) = (verdict, decoded) {
                // The free text is bounded (it goes into the campaign record and a log
                // line); the rest is what the device sent.
                for text in [&p.detail, &p.running_version] {
                    assert!(text.len() <= MAX_DETAIL_LEN, "{} bytes of text", text.len());
                    assert!(!text.chars().any(char::is_control), "control character");
                }
                let rest = UpdateProgress {
                    detail: d.detail.clone(),
                    running_version: d.running_version.clone(),
                    ..p
                };
                assert_eq!(rest, d);
            }
        }
        4 => {
            if rest.len() < 7 {
                return;
            }
            let (params, payload) = rest.split_at(7);
            chunk_request(params, payload);
        }
        _ => {
            let Some((&n, payload)) = rest.split_first() else {
                return;
            };
            // The gateway's newest root version: none, or one of a few.
            let newest = (n % 4 != 0).then_some(u64::from(n % 4));
            let verdict = fuzzing::trust_report(payload, newest, NOW_MS);
            bounded(&verdict);
            let decoded = (payload.len() <= MAX_TRUST_REPORT_LEN)
                .then(|| TrustReport::decode(payload).ok())
                .flatten();
            assert_eq!(verdict.is_ok(), decoded.is_some(), "trust report");
            if let (Ok((r, behind)), Some(d)) = (verdict, decoded) {
                assert_eq!(r, d);
                let expired =
                    d.root_expired || (d.root_version != 0 && d.root_expires_at_ms <= NOW_MS);
                let older = newest.is_some_and(|v| d.root_version < v);
                assert_eq!(behind, expired || older, "behind {newest:?}: {d:?}");
            }
        }
    }
});
