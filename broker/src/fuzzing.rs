//! Entry points for the fuzz targets in `fuzz/`. **Not an API**: hidden from the
//! documentation, with no stability promise; nothing outside `fuzz/` may use it.
//!
//! The checks the gateway runs on what reaches it from the network are crate-private. The fuzz
//! targets are built outside this crate (own workspace, coverage instrumentation), so they
//! reach those checks through the thin wrappers below. Each wrapper calls the gateway's own
//! function and only converts its types (errors become their messages, so that the crate's
//! error enums stay private); nothing here changes what the gateway does. Where a service
//! checks a message inline in its task (command results, chunk requests), the wrapper runs
//! the same decode and the same helpers the task calls, and says where that code is.

use bytes::Bytes;
use fleet_proto::v1::{
    ChunkRequest, CommandResult, SignedManifest, TrustReport, UpdateManifest, UpdateProgress,
    UploadChunk,
};
use fleet_proto::{GatewayId, Message as _};

use crate::acl::filter;
use crate::bridge::mapping;
use crate::router::Received;
use crate::services::updates::{self, limits, queue};
use crate::services::{commands, registry, status, trust};

/// The bridge's topic rules (`bridge/mapping.rs`).
#[derive(Debug, Clone)]
pub struct Mapping(mapping::Mapping);

impl Mapping {
    /// Rules for `gateway` with the local filters `up` and `down` (as `bridge.up` and
    /// `bridge.down` in the configuration).
    pub fn new(gateway: GatewayId, up: Vec<String>, down: Vec<String>) -> Self {
        Mapping(mapping::Mapping::new(gateway, up, down))
    }

    /// The upstream name of a local topic.
    pub fn upstream(&self, local: &str) -> String {
        self.0.upstream(local)
    }

    /// The local topic of an upstream one, if it is this gateway's and may come down.
    pub fn local<'a>(&self, upstream: &'a str) -> Option<&'a str> {
        self.0.local(upstream)
    }

    /// What the bridge subscribes to upstream.
    pub fn down_subscriptions(&self) -> Vec<String> {
        self.0.down_subscriptions()
    }

    /// What the bridge's local link subscribes to (the messages that go up), less the filters
    /// that match only status topics when the store queues status reports (`status_queued`).
    pub fn link_filters(&self, status_queued: bool) -> Vec<String> {
        self.0.link_filters(status_queued)
    }

    /// Whether the bridge's link queues a message it received on `local`.
    pub fn queue_from_link(&self, local: &str) -> bool {
        self.0.queue_from_link(local)
    }
}

/// Whether the `up` filters carry device status reports (`bridge/mapping.rs`).
pub fn status_up(up: &[String]) -> bool {
    mapping::status_up(up)
}

/// The ACL's check of a topic name (`acl/filter.rs`).
pub fn check_name(topic: &str) -> Result<(), String> {
    filter::check_name(topic).map_err(|e| e.to_string())
}

/// The ACL's check of a topic filter (`acl/filter.rs`).
pub fn check_filter(topic_filter: &str) -> Result<(), String> {
    filter::check_filter(topic_filter).map_err(|e| e.to_string())
}

/// Whether every topic `inner` matches is matched by `outer` (`acl/filter.rs`).
pub fn within(inner: &str, outer: &str) -> bool {
    filter::within(inner, outer)
}

/// The update service's check of a `CreateUpdate` (`services/updates/limits.rs`): the total
/// size of the images, or why the request is refused.
pub fn check_create(
    signed: &SignedManifest,
    manifest: &UpdateManifest,
    max_update_bytes: u64,
) -> Result<u64, String> {
    limits::check_create(signed, manifest, max_update_bytes).map_err(|e| e.to_string())
}

/// The update service's check of an `UploadChunk` (`services/updates/limits.rs`).
pub fn check_upload(req: &UploadChunk) -> Result<(), String> {
    limits::check_upload(req).map_err(|e| e.to_string())
}

/// A status report `device` published on `devices/{device}/status`: decoded and checked as
/// the status owner does before it stores one (`services/status.rs`, `status_item`).
pub fn status_report(device: &str, payload: &[u8]) -> Result<(), String> {
    status::status_item(device, payload)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A presence message on `topic`: decoded and checked as the registry does before it stores
/// one (`services/registry.rs`, `presence_item`).
pub fn presence(topic: &str, payload: &[u8]) -> Result<(), String> {
    let msg = Received {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload),
    };
    registry::presence_item(&msg)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A command result: decoded, and refused without a closing status, as the command service's
/// `on_result` does before it looks the command up (`services/commands.rs`).
pub fn command_result(payload: &[u8]) -> Result<CommandResult, String> {
    let r = CommandResult::decode(payload).map_err(|e| e.to_string())?;
    match commands::closing_state(r.status()) {
        Some(_) => Ok(r),
        None => Err("command result without a status".to_owned()),
    }
}

/// Update progress as the update service checks it before it hands it to a campaign
/// (`services/updates/mod.rs`, `checked_progress`).
pub fn update_progress(payload: &[u8]) -> Result<UpdateProgress, String> {
    updates::checked_progress(payload).map_err(|e| e.to_string())
}

/// A chunk request for a component of `chunk_count` chunks: decoded, its ids checked, its
/// window bounded by the settings, and the chunk indexes it wants (what the update service's
/// `on_get` queues for the device, `services/updates/mod.rs` and `queue.rs`).
pub fn chunk_request(
    payload: &[u8],
    chunk_count: u32,
    default_window: u32,
    max_window: u32,
) -> Result<(ChunkRequest, Vec<u32>), String> {
    let req = ChunkRequest::decode(payload).map_err(|e| e.to_string())?;
    fleet_proto::ids::validate_id(&req.update_id)
        .and_then(|()| fleet_proto::ids::validate_id(&req.component))
        .map_err(|e| e.to_string())?;
    let window = queue::window(req.window, default_window, max_window);
    let wanted = queue::wanted(&req, chunk_count, window).map_err(|e| e.to_string())?;
    Ok((req, wanted))
}

/// A trust report: read within its bound as the trust service does (`services/trust.rs`,
/// `decode_report`), then whether it shows the device behind `newest` at `now_ms`
/// (`is_behind`).
pub fn trust_report(
    payload: &[u8],
    newest: Option<u64>,
    now_ms: u64,
) -> Result<(TrustReport, bool), String> {
    let r = trust::decode_report(payload)?;
    let behind = trust::is_behind(&r, newest, now_ms);
    Ok((r, behind))
}

/// The most bytes of a trust report the gateway reads.
pub const MAX_TRUST_REPORT_LEN: usize = trust::MAX_TRUST_REPORT_LEN;

/// The most ranges a chunk request may carry.
pub const MAX_RANGES: usize = queue::MAX_RANGES;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::v1::{
        ChunkRange, CommandStatus, Presence, PresenceState, StatusReport, UpdatePhase,
    };

    // The wrappers pass the gateway's verdicts through: one accepted and one refused input
    // each, through the same functions the services call.
    #[test]
    fn wrappers_give_the_gateways_verdicts() {
        let status = StatusReport {
            sequence: 3,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(status_report("dev-1", &status), Ok(()));
        assert!(status_report("dev-1", &StatusReport::default().encode_to_vec()).is_err());
        assert!(status_report("no/such", &status).is_err());

        let online = Presence {
            state: PresenceState::Online.into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(presence("devices/dev-1/presence", &online), Ok(()));
        assert!(presence("devices/dev-1/status", &online).is_err());
        assert!(presence("devices/dev-1/presence", &[]).is_err());

        let done = CommandResult {
            command_id: "c-1".into(),
            status: CommandStatus::Succeeded.into(),
            ..Default::default()
        };
        assert_eq!(command_result(&done.encode_to_vec()), Ok(done));
        assert!(command_result(&CommandResult::default().encode_to_vec()).is_err());

        let progress = UpdateProgress {
            update_id: "u-1".into(),
            phase: UpdatePhase::Downloading.into(),
            ..Default::default()
        };
        assert_eq!(update_progress(&progress.encode_to_vec()), Ok(progress));
        assert!(update_progress(&UpdateProgress::default().encode_to_vec()).is_err());

        let mut req = ChunkRequest {
            update_id: "u-1".into(),
            component: "rootfs".into(),
            ranges: vec![ChunkRange { start: 2, end: 9 }],
            window: 3,
            ..Default::default()
        };
        let (_, wanted) = chunk_request(&req.encode_to_vec(), 5, 8, 16).unwrap();
        assert_eq!(wanted, [2, 3, 4]);
        req.ranges = vec![ChunkRange { start: 0, end: 1 }; MAX_RANGES + 1];
        assert!(chunk_request(&req.encode_to_vec(), 5, 8, 16).is_err());
        req.ranges.clear();
        req.component = "../etc".into();
        assert!(chunk_request(&req.encode_to_vec(), 5, 8, 16).is_err());

        let report = TrustReport {
            root_version: 2,
            root_expires_at_ms: 100,
            ..Default::default()
        };
        assert_eq!(
            trust_report(&report.encode_to_vec(), Some(3), 50),
            Ok((report.clone(), true))
        );
        assert_eq!(
            trust_report(&report.encode_to_vec(), Some(2), 50),
            Ok((report, false))
        );
        assert!(trust_report(&vec![0; MAX_TRUST_REPORT_LEN + 1], None, 50).is_err());

        let m = Mapping::new(
            GatewayId::new("gw-1").unwrap(),
            vec!["devices/+/status".into()],
            vec!["fleet/api/+/request".into()],
        );
        assert_eq!(
            m.local("gateways/gw-1/fleet/api/s/request"),
            Some("fleet/api/s/request")
        );
        assert_eq!(m.local("gateways/gw-1/devices/d/cmd"), None);
        assert!(status_up(&m.link_filters(false)));
        assert!(m.link_filters(true).is_empty());
        assert!(!m.queue_from_link("devices/d/status"));
        assert!(check_name("a/b").is_ok() && check_name("a/+").is_err());
        assert!(check_filter("a/+").is_ok() && check_filter("a/b+").is_err());
        assert!(within("a/b", "a/+") && !within("a/+", "a/b"));
        let upload = UploadChunk {
            update_id: "u-1".into(),
            component: "rootfs".into(),
            ..Default::default()
        };
        assert_eq!(check_upload(&upload), Ok(()));
        assert!(check_create(&SignedManifest::default(), &UpdateManifest::default(), 1).is_err());
    }
}
