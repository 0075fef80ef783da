//! The status owner: what happens to a device's status report between its socket and its
//! acknowledgement.
//!
//! **A report is stored, and queued upward when a bridge carries status, before it is
//! acknowledged.** The edge offers each report a device publishes through the
//! [`StatusIntake`](crate::ports::StatusIntake) the assembly handed it and waits for the verdict. This module decodes it,
//! stores it and (when `uplink` is on, decided from the configuration by the assembly) puts
//! its upward copy in the bridge's queue, both in one store transaction; only then does it
//! answer [`StatusVerdict::Stored`], and only then does the edge let the router acknowledge
//! and route the report. A gateway killed at any moment therefore holds, and will send
//! upward, every report a device saw acknowledged; a report it had not acknowledged is still
//! in the device's outbox and sent again.
//!
//! Reports that arrive while a batch is written are written together (up to [`MAX_BATCH`]),
//! so one disk sync covers many devices. A report not newer than the stored one (a re-send) or
//! one that does not decode is acknowledged but neither stored, queued nor routed
//! ([`StatusVerdict::Dropped`]); a store failure is [`StatusVerdict::Failed`]: not
//! acknowledged.

use std::sync::Arc;

use fleet_proto::topics::{self, DeviceTopic};
use fleet_proto::v1::StatusReport;
use fleet_proto::{DeviceId, Message};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::registry::Refused;
use crate::metrics::Metrics;
use crate::ports::{StatusOffer, StatusVerdict};
use crate::store::{SharedStore, StatusOutcome, StatusWrite};

/// Most reports written in one transaction.
pub(crate) const MAX_BATCH: usize = 512;
/// Reports waiting for the owner before publishers wait for room: the capacity the assembly
/// gives the [`crate::ports::StatusIntake`] channel.
pub(crate) const QUEUE: usize = 4096;

/// A decoded, checked status report, ready to store.
#[derive(Debug, Clone)]
pub(crate) struct StatusItem {
    device: String,
    topic: String,
    sequence: u64,
    class: String,
    bytes: Vec<u8>,
}

/// Checks a report `device` published: pure, so the rules are testable without a gateway.
pub(crate) fn status_item(device: &str, payload: &[u8]) -> Result<StatusItem, Refused> {
    let id = DeviceId::new(device).map_err(|_| Refused::Topic)?;
    let r = StatusReport::decode(payload)?;
    if r.sequence == 0 {
        return Err(Refused::Invalid("status report without a sequence"));
    }
    Ok(StatusItem {
        device: device.to_owned(),
        topic: topics::device_topic(&id, DeviceTopic::Status),
        sequence: r.sequence,
        class: r.device_class,
        bytes: payload.to_vec(),
    })
}

/// Starts the status owner on the receiving end of a [`crate::ports::StatusIntake`]; `uplink`: stored
/// reports are also queued for the bridge.
pub(crate) fn start(
    offers: mpsc::Receiver<StatusOffer>,
    store: SharedStore,
    metrics: Arc<Metrics>,
    uplink: bool,
) {
    tokio::spawn(run(offers, store, metrics, uplink));
}

async fn run(
    mut offers: mpsc::Receiver<StatusOffer>,
    store: SharedStore,
    metrics: Arc<Metrics>,
    uplink: bool,
) {
    while let Some(first) = offers.recv().await {
        let mut items = Vec::new();
        let mut replies = Vec::new();
        let mut next = Some(first);
        while let Some(offer) = next.take() {
            match status_item(&offer.device, &offer.payload) {
                Ok(item) => {
                    items.push(item);
                    replies.push(offer.reply);
                }
                Err(e) => {
                    if let Some(suppressed) = metrics.malformed_payload() {
                        warn!(device = %offer.device, error = %e, suppressed, "status report dropped: not a valid StatusReport");
                    }
                    let _ = offer.reply.send(StatusVerdict::Dropped);
                }
            }
            if items.len() < MAX_BATCH {
                next = offers.try_recv().ok();
            }
        }
        if items.is_empty() {
            continue;
        }
        // The test-only broken order: acknowledged now, stored later.
        #[cfg(feature = "fault-injection")]
        if let Some(delay) = crate::fault::status_ack_first_delay() {
            for reply in replies.drain(..) {
                let _ = reply.send(StatusVerdict::Stored);
            }
            tokio::time::sleep(delay).await;
        }
        let now = fleet_proto::time::now_ms();
        let written = store
            .call("store status reports", move |s| {
                s.write(|tx| {
                    let mut outcomes = Vec::with_capacity(items.len());
                    for i in &items {
                        let w = StatusWrite {
                            device_id: &i.device,
                            sequence: i.sequence,
                            report: &i.bytes,
                            device_class: Some(&i.class),
                        };
                        let o = tx.put_status(&w, now)?;
                        if uplink && o == StatusOutcome::Stored {
                            tx.enqueue_uplink(&i.topic, &i.bytes, now)?;
                        }
                        outcomes.push(o);
                    }
                    Ok(outcomes)
                })
            })
            .await;
        let Ok(outcomes) = written else {
            // Logged and counted by the store layer.
            for reply in replies {
                let _ = reply.send(StatusVerdict::Failed);
            }
            continue;
        };
        for (o, reply) in outcomes.into_iter().zip(replies) {
            let verdict = match o {
                StatusOutcome::Stored => {
                    Metrics::inc(&metrics.status_stored);
                    StatusVerdict::Stored
                }
                StatusOutcome::Stale { stored } => {
                    Metrics::inc(&metrics.status_duplicates);
                    debug!(stored, "duplicate or late status report not stored");
                    StatusVerdict::Dropped
                }
            };
            let _ = reply.send(verdict);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ports::StatusIntake;
    use crate::store::Store;

    fn report(sequence: u64) -> bytes::Bytes {
        StatusReport {
            sequence,
            ..StatusReport::default()
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn bad_reports_are_refused_with_a_reason() {
        assert!(matches!(
            status_item("dev-1", &report(3)),
            Ok(StatusItem { sequence: 3, .. })
        ));
        for payload in [vec![0xff, 0xff, 0xff], Vec::new(), b"not protobuf".to_vec()] {
            assert!(status_item("dev-1", &payload).is_err(), "{payload:?}");
        }
        assert!(matches!(
            status_item("no/such id", &report(3)),
            Err(Refused::Topic)
        ));
    }

    /// Offers reports through the intake as the edge does; what the store and the bridge's
    /// queue hold afterwards.
    async fn run_intake(uplink: bool) -> (Vec<StatusVerdict>, Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let store = SharedStore::new(Store::open_in(dir.path()).unwrap(), metrics.clone());
        let (intake, offers) = StatusIntake::channel(QUEUE);
        start(offers, store, metrics.clone(), uplink);
        let mut verdicts = Vec::new();
        for (device, payload) in [
            ("dev-1", report(1)),
            ("dev-1", report(1)),
            ("dev-2", report(5)),
            ("dev-2", bytes::Bytes::from_static(b"\xff\xff")),
        ] {
            verdicts.push(intake.offer(device, payload).await);
        }
        assert_eq!(Metrics::get(&metrics.status_stored), 2);
        assert_eq!(Metrics::get(&metrics.status_duplicates), 1);
        assert_eq!(Metrics::get(&metrics.malformed_payloads), 1);
        let s = Store::open_in(dir.path()).unwrap();
        (verdicts, s, dir)
    }

    #[tokio::test]
    async fn a_stored_report_is_queued_upward_in_the_same_transaction_only_when_asked() {
        use StatusVerdict::{Dropped, Stored};
        let (verdicts, s, _dir) = run_intake(true).await;
        assert_eq!(verdicts, [Stored, Dropped, Stored, Dropped]);
        assert_eq!(s.device_state("dev-2").unwrap().unwrap().reports_stored, 1);
        let up: Vec<(String, Vec<u8>)> = s
            .uplink_after(0, 10)
            .unwrap()
            .into_iter()
            .map(|q| (q.topic, q.payload))
            .collect();
        assert_eq!(
            up,
            [
                ("devices/dev-1/status".to_owned(), report(1).to_vec()),
                ("devices/dev-2/status".to_owned(), report(5).to_vec()),
            ]
        );

        let (verdicts, s, _dir) = run_intake(false).await;
        assert_eq!(verdicts, [Stored, Dropped, Stored, Dropped]);
        assert!(s.device_state("dev-1").unwrap().is_some());
        assert!(s.uplink_after(0, 10).unwrap().is_empty());
    }
}
