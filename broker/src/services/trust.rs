//! The trust service: the gateway's side of the chain of trust. It holds no key and can make
//! nothing the fleet's keys did not sign; it keeps and distributes what they signed.
//!
//! * Roots: the newest [`MAX_CHAIN_ROOTS`] roots it accepted (the configured first root, then
//!   each successor a service hands it with PublishRoot, accepted by the same rules as a
//!   device: signed by a threshold of the current and of its own root keys, newer, unexpired)
//!   are stored and published as a `RootChain`, retained at QoS 1, on `fleet/trust/roots` at
//!   start and whenever the chain changes; GetTrust answers what is distributed.
//! * Reports: each device's last `TrustReport` (`devices/{id}/trust`) is stored for GetStatus,
//!   a `TrustEvent` is published on `fleet/events/trust/{id}` when it changes, and the gauge
//!   `trust_devices_behind` counts devices whose root is expired or older than the newest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::topics::{self, DeviceTopic, Topic};
use fleet_proto::trust::{build, TrustError, TrustedRoot, MAX_CHAIN_ROOTS};
use fleet_proto::v1::{
    api_request, api_response, ApiError, ApiErrorCode, RootChain, TrustEvent, TrustRecord,
    TrustReport,
};
use fleet_proto::Message;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::api::{api_error, response};
use super::updates::ApiCall;
use crate::metrics::Metrics;
use crate::router::{LinkError, Received, Router, ServiceLink};
use crate::store::SharedStore;

/// Largest encoded TrustReport read (its only free text, `detail`, is at most 512 bytes).
pub(crate) const MAX_TRUST_REPORT_LEN: usize = 4 * 1024;

/// How often the gauge of devices behind is recounted (a root's expiry passes without any
/// message saying so).
const RECOUNT_EVERY: Duration = Duration::from_secs(60);

/// Whether `signed` may become the newest root: the successor of `newest` by the device rules,
/// or, when the gateway holds none, a well-formed root signed by a threshold of its own root
/// keys.
pub(crate) fn accept_root(
    newest: Option<&TrustedRoot>,
    signed: &[u8],
    now_ms: u64,
) -> Result<TrustedRoot, TrustError> {
    match newest {
        None => TrustedRoot::provisioned(signed),
        Some(current) => current.accept_next(signed, now_ms),
    }
}

/// Whether a device reporting `r` is behind at `now_ms`: its root has expired, or it is older
/// than `newest` (the version the gateway distributes; a device with no root is older).
pub(crate) fn is_behind(r: &TrustReport, newest: Option<u64>, now_ms: u64) -> bool {
    let expired = r.root_expired || (r.root_version != 0 && r.root_expires_at_ms <= now_ms);
    expired || newest.is_some_and(|v| r.root_version < v)
}

/// Reads a trust report off the wire, within its bound.
pub(crate) fn decode_report(payload: &[u8]) -> Result<TrustReport, String> {
    if payload.len() > MAX_TRUST_REPORT_LEN {
        return Err(format!(
            "{} bytes; at most {MAX_TRUST_REPORT_LEN} are read",
            payload.len()
        ));
    }
    TrustReport::decode(payload).map_err(|e| format!("not a fleet.v1.TrustReport: {e}"))
}

/// Whether two reports say something different (the time each was composed aside).
fn differs(old: &TrustReport, new: &TrustReport) -> bool {
    let strip = |r: &TrustReport| TrustReport {
        timestamp_ms: 0,
        ..r.clone()
    };
    strip(old) != strip(new)
}

/// The trust service task.
pub(crate) struct TrustService {
    link: ServiceLink,
    store: SharedStore,
    metrics: Arc<Metrics>,
    calls: mpsc::UnboundedReceiver<ApiCall>,
    /// What is distributed: encoded SignedRoots, oldest first.
    chain: Vec<Vec<u8>>,
    /// The newest of them, checked.
    newest: Option<TrustedRoot>,
    /// Each device's last report.
    reports: HashMap<String, TrustReport>,
}

impl TrustService {
    /// Opens the service's link, loads the stored roots and reports, and takes `first_root`
    /// (the configured root, already checked to be a well-formed, self-signed root) if it is
    /// the first or a valid successor of the newest stored.
    pub(crate) async fn start(
        router: &Router,
        store: SharedStore,
        metrics: Arc<Metrics>,
        first_root: Option<Vec<u8>>,
        calls: mpsc::UnboundedReceiver<ApiCall>,
    ) -> Result<Self, LinkError> {
        let reports_filter = topics::all_devices_filter(DeviceTopic::Trust);
        let link = ServiceLink::open(router, "trust", &[&reports_filter]).await?;
        let (stored, reports) = store
            .call("load trust", |s| Ok((s.trust_roots()?, s.trust_reports()?)))
            .await
            .unwrap_or_default();
        let mut chain: Vec<Vec<u8>> = stored.into_iter().map(|(_, b)| b).collect();
        // Every stored root was checked before it was stored; the newest is parsed again for
        // its keys and version.
        let mut newest = None;
        while let Some(last) = chain.last() {
            match TrustedRoot::provisioned(last) {
                Ok(r) => {
                    newest = Some(r);
                    break;
                }
                Err(e) => {
                    error!(error = %e, "a stored root no longer reads; it is not distributed");
                    chain.pop();
                }
            }
        }
        let reports = reports
            .into_iter()
            .filter_map(|(d, b)| TrustReport::decode(b.as_slice()).ok().map(|r| (d, r)))
            .collect();
        let mut this = TrustService {
            link,
            store,
            metrics,
            calls,
            chain,
            newest,
            reports,
        };
        if let Some(bytes) = first_root {
            match this.add_root(bytes).await {
                Ok(true) => info!("configured root taken"),
                Ok(false) => {}
                Err(e) => match (&e, &this.newest) {
                    (TrustError::NotNewer { .. }, Some(_)) => {
                        debug!(error = %e, "configured root already superseded")
                    }
                    _ => warn!(error = %e, "configured root not taken"),
                },
            }
        }
        Ok(this)
    }

    /// Runs until the router is gone.
    pub(crate) async fn run(mut self) {
        self.publish_chain().await;
        self.recount();
        let mut recount = tokio::time::interval(RECOUNT_EVERY);
        recount.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.link.recv() => match msg {
                    Some(msg) => self.on_message(msg).await,
                    None => break,
                },
                call = self.calls.recv() => match call {
                    Some(call) => self.on_call(call).await,
                    None => break,
                },
                _ = recount.tick() => self.recount(),
            }
        }
        info!("trust service stopped");
    }

    /// Takes `bytes` as the newest root if [`accept_root`] allows it; `Ok(false)` if the store
    /// failed.
    async fn add_root(&mut self, bytes: Vec<u8>) -> Result<bool, TrustError> {
        let now = fleet_proto::time::now_ms();
        let root = accept_root(self.newest.as_ref(), &bytes, now)?;
        let (version, signed) = (root.version, bytes.clone());
        let stored = self
            .store
            .call("add root", move |s| {
                s.add_trust_root(version, &signed, MAX_CHAIN_ROOTS, now)
            })
            .await;
        if stored.is_err() {
            return Ok(false);
        }
        info!(
            version,
            expires_at_ms = root.expires_at_ms,
            "root of trust accepted"
        );
        self.chain.push(bytes);
        let skip = self.chain.len().saturating_sub(MAX_CHAIN_ROOTS);
        self.chain.drain(..skip);
        self.newest = Some(root);
        Ok(true)
    }

    /// Publishes the chain, retained, for every device (nothing while there is none).
    async fn publish_chain(&mut self) {
        if self.chain.is_empty() {
            return;
        }
        let bytes = build::chain(&self.chain).encode_to_vec();
        if let Err(e) = self
            .link
            .publish_retained(topics::TRUST_ROOTS.to_owned(), bytes)
            .await
        {
            warn!(error = %e, "could not publish the root chain");
        }
    }

    fn record(&self) -> TrustRecord {
        TrustRecord {
            chain: Some(RootChain {
                roots: self.chain.clone(),
            }),
            version: self.newest.as_ref().map_or(0, |r| r.version),
            expires_at_ms: self.newest.as_ref().map_or(0, |r| r.expires_at_ms),
        }
    }

    async fn on_call(&mut self, call: ApiCall) {
        let ApiCall {
            service,
            request_id,
            body,
        } = call;
        let answer: Result<TrustRecord, ApiError> = match body {
            api_request::Body::PublishRoot(req) => match self.add_root(req.signed_root).await {
                Ok(true) => {
                    info!(service, "root published by a service");
                    self.publish_chain().await;
                    self.recount();
                    Ok(self.record())
                }
                Ok(false) => Err(api_error(
                    ApiErrorCode::Unavailable,
                    "the gateway's store failed; see its log",
                )),
                Err(e) => {
                    warn!(service, error = %e, "root refused");
                    Err(api_error(
                        ApiErrorCode::Invalid,
                        format!("root refused: {e}"),
                    ))
                }
            },
            api_request::Body::GetTrust(_) => Ok(self.record()),
            _ => Err(api_error(
                ApiErrorCode::Invalid,
                "not a trust request (a bug: misrouted)",
            )),
        };
        let body = answer.map_or_else(api_response::Body::Error, api_response::Body::Trust);
        let (topic, bytes) = response(&service, request_id, body);
        if let Err(e) = self.link.publish(topic, bytes) {
            warn!(service, error = %e, "could not publish an API response");
        }
    }

    async fn on_message(&mut self, msg: Received) {
        let Ok(Topic::Device {
            id,
            kind: DeviceTopic::Trust,
        }) = topics::parse(&msg.topic)
        else {
            debug!(topic = %msg.topic, "trust service: unexpected topic");
            return;
        };
        if msg.payload.is_empty() {
            // A cleared retained report: nothing to record.
            return;
        }
        let device = id.to_string();
        let report = match decode_report(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                if let Some(suppressed) = self.metrics.malformed_payload() {
                    warn!(device, error = %e, suppressed, "trust report dropped");
                }
                return;
            }
        };
        let (dev, bytes) = (device.clone(), msg.payload.to_vec());
        let now = fleet_proto::time::now_ms();
        let Ok(old) = self
            .store
            .call("store trust report", move |s| {
                s.put_trust_report(&dev, &bytes, now)
            })
            .await
        else {
            return;
        };
        let changed = old
            .and_then(|b| TrustReport::decode(b.as_slice()).ok())
            .is_none_or(|o| differs(&o, &report));
        self.reports.insert(device.clone(), report.clone());
        if changed {
            // An unchanged report (a reconnect) cannot move the gauge; expiry is the periodic
            // recount's.
            self.recount();
            info!(device, root_version = report.root_version, root_expired = report.root_expired, refused_version = report.refused_version, refusal = ?report.refusal(), "device trust changed");
            let ev = TrustEvent {
                device_id: device.clone(),
                report: Some(report),
            };
            if let Err(e) = self
                .link
                .publish(topics::trust_events_topic(&device), ev.encode_to_vec())
            {
                warn!(error = %e, "could not publish a trust event");
            }
        }
    }

    /// Sets the gauge of devices behind.
    fn recount(&self) {
        let now = fleet_proto::time::now_ms();
        let newest = self.newest.as_ref().map(|r| r.version);
        let n = self
            .reports
            .values()
            .filter(|r| is_behind(r, newest, now))
            .count();
        Metrics::set(
            &self.metrics.trust_devices_behind,
            u64::try_from(n).unwrap_or(u64::MAX),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(version: u64, expires: u64, expired: bool) -> TrustReport {
        TrustReport {
            root_version: version,
            root_expires_at_ms: expires,
            root_expired: expired,
            ..TrustReport::default()
        }
    }

    #[test]
    fn a_device_is_behind_when_its_root_is_older_or_expired() {
        assert!(!is_behind(&report(2, 1_000, false), Some(2), 500));
        assert!(!is_behind(&report(3, 1_000, false), Some(2), 500));
        assert!(is_behind(&report(1, 1_000, false), Some(2), 500));
        assert!(is_behind(&report(2, 1_000, true), Some(2), 500));
        assert!(is_behind(&report(2, 1_000, false), Some(2), 1_000));
        // No root at all: behind whatever the gateway has.
        assert!(is_behind(&report(0, 0, false), Some(1), 500));
        assert!(!is_behind(&report(0, 0, false), None, 500));
    }

    #[test]
    fn reports_are_bounded_and_compared_without_their_time() {
        assert!(decode_report(&vec![0u8; MAX_TRUST_REPORT_LEN + 1]).is_err());
        assert!(decode_report(b"not protobuf").is_err());
        let a = report(1, 5, false);
        let mut b = a.clone();
        b.timestamp_ms = 99;
        assert!(!differs(&a, &b));
        b.root_version = 2;
        assert!(differs(&a, &b));
    }
}
