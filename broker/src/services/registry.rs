//! The status registry: the last StatusReport and Presence of every device, persisted.
//!
//! * **Status reports are stored before they are acknowledged.** The edge hands each report a
//!   device publishes to the [`StatusWriter`] and waits: only a stored report goes on to the
//!   router (which acknowledges it to the device and routes it to subscribers). A gateway
//!   killed at any moment therefore holds every report a device saw acknowledged; a report it
//!   had not acknowledged is still in the device's outbox and sent again. The writer batches
//!   whatever arrived while the previous batch was written (up to [`MAX_BATCH`]), so one disk
//!   sync covers many devices. A report not newer than the stored one (a re-send) is
//!   acknowledged but neither stored nor routed again.
//! * Presence is read from the registry's own link on `devices/+/presence`.
//!
//! The device id comes from the topic, which the edge's ACL guarantees is the publisher's own.

use std::sync::Arc;

use fleet_proto::topics::{self, DeviceTopic, Topic};
use fleet_proto::v1::{Presence, PresenceState, StatusReport};
use fleet_proto::Message;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::router::RouterHandle;
use crate::router::{LinkError, Received, ServiceLink};
use crate::store::SharedStore;
use crate::store::{StatusOutcome, StatusWrite};

/// Most reports written in one transaction.
pub const MAX_BATCH: usize = 512;
/// Reports waiting for the writer before publishers wait for room.
const QUEUE: usize = 4096;

/// Why a payload is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not a topic the registry reads.
    #[error("not a device status or presence topic")]
    Topic,
    /// Not protobuf of the topic's message.
    #[error("bad protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Decodes, but a required field is missing.
    #[error("{0}")]
    Invalid(&'static str),
}

/// A decoded, checked status report, ready to store.
#[derive(Debug, Clone)]
pub struct StatusItem {
    device: String,
    sequence: u64,
    class: String,
    bytes: Vec<u8>,
}

/// Checks a report `device` published: pure, so the rules are testable without a gateway.
pub fn status_item(device: &str, payload: &[u8]) -> Result<StatusItem, Refused> {
    let r = StatusReport::decode(payload)?;
    if r.sequence == 0 {
        return Err(Refused::Invalid("status report without a sequence"));
    }
    Ok(StatusItem {
        device: device.to_owned(),
        sequence: r.sequence,
        class: r.device_class,
        bytes: payload.to_vec(),
    })
}

/// A checked presence message.
struct PresenceItem {
    device: String,
    class: String,
    bytes: Vec<u8>,
}

fn presence_item(msg: &Received) -> Result<PresenceItem, Refused> {
    let Ok(Topic::Device {
        id,
        kind: DeviceTopic::Presence,
    }) = topics::parse(&msg.topic)
    else {
        return Err(Refused::Topic);
    };
    let p = Presence::decode(msg.payload.as_ref())?;
    if !matches!(p.state(), PresenceState::Online | PresenceState::Offline) {
        return Err(Refused::Invalid("presence without a state"));
    }
    Ok(PresenceItem {
        device: id.to_string(),
        class: p.device_class,
        bytes: msg.payload.to_vec(),
    })
}

type Job = (StatusItem, oneshot::Sender<Option<StatusOutcome>>);

/// Where the edge stores status reports before acknowledging them. Cheap to clone.
#[derive(Clone)]
pub struct StatusWriter {
    tx: mpsc::Sender<Job>,
}

impl StatusWriter {
    /// Stores a report (batched with others); `None` when the store failed (logged and
    /// counted by the store layer): the report must not be acknowledged.
    pub async fn store(&self, item: StatusItem) -> Option<StatusOutcome> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((item, tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Starts the writer task.
    pub fn start(store: SharedStore, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(rx, store, metrics));
        StatusWriter { tx }
    }
}

async fn write_loop(mut rx: mpsc::Receiver<Job>, store: SharedStore, metrics: Arc<Metrics>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<StatusItem>, Vec<_>) = jobs.into_iter().unzip();
        let now = fleet_proto::time::now_ms();
        let outcome = store
            .call("store status reports", move |s| {
                let writes: Vec<StatusWrite<'_>> = items
                    .iter()
                    .map(|i| StatusWrite {
                        device_id: &i.device,
                        sequence: i.sequence,
                        report: &i.bytes,
                        device_class: Some(&i.class),
                    })
                    .collect();
                s.put_statuses(&writes, now)
            })
            .await;
        match outcome {
            Ok(outcomes) => {
                for (o, reply) in outcomes.into_iter().zip(replies) {
                    match o {
                        StatusOutcome::Stored => Metrics::inc(&metrics.status_stored),
                        StatusOutcome::Stale { stored } => {
                            Metrics::inc(&metrics.status_duplicates);
                            debug!(stored, "duplicate or late status report not stored");
                        }
                    }
                    let _ = reply.send(Some(o));
                }
            }
            Err(_) => {
                for reply in replies {
                    let _ = reply.send(None);
                }
            }
        }
    }
}

/// The presence reader task.
pub struct Registry {
    link: ServiceLink,
    store: SharedStore,
    metrics: Arc<Metrics>,
}

impl Registry {
    /// Opens the registry's link.
    pub async fn start(
        router: &RouterHandle,
        store: SharedStore,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LinkError> {
        let presence = topics::all_devices_filter(DeviceTopic::Presence);
        let link = ServiceLink::open(router, "registry", &[&presence]).await?;
        Ok(Registry {
            link,
            store,
            metrics,
        })
    }

    /// Runs until the router is gone.
    pub async fn run(mut self) {
        while let Some(msg) = self.link.recv().await {
            let item = match presence_item(&msg) {
                Ok(i) => i,
                Err(e) => {
                    Metrics::inc(&self.metrics.malformed_payloads);
                    warn!(topic = %msg.topic, error = %e, "registry: message dropped");
                    continue;
                }
            };
            let now = fleet_proto::time::now_ms();
            let _ = self
                .store
                .call("store presence", move |s| {
                    s.put_presence(&item.device, &item.bytes, now)?;
                    s.set_device_class(&item.device, &item.class)
                })
                .await;
        }
        info!("status registry stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: Vec<u8>) -> Received {
        Received {
            topic: topic.into(),
            payload: payload.into(),
        }
    }

    #[test]
    fn bad_messages_are_refused_with_a_reason() {
        let ok = StatusReport {
            sequence: 3,
            ..StatusReport::default()
        }
        .encode_to_vec();
        assert!(matches!(
            status_item("dev-1", &ok),
            Ok(StatusItem { sequence: 3, .. })
        ));
        for payload in [vec![0xff, 0xff, 0xff], Vec::new(), b"not protobuf".to_vec()] {
            assert!(status_item("dev-1", &payload).is_err(), "{payload:?}");
        }
        let online = Presence {
            state: PresenceState::Online.into(),
            ..Presence::default()
        }
        .encode_to_vec();
        assert!(presence_item(&msg("devices/dev-1/presence", online.clone())).is_ok());
        for (topic, payload) in [
            (
                "devices/dev-1/presence",
                Presence::default().encode_to_vec(),
            ),
            ("devices/dev-1/presence", vec![0x08]),
            ("devices/dev-1/status", online),
            ("elsewhere", Vec::new()),
        ] {
            assert!(
                presence_item(&msg(topic, payload.clone())).is_err(),
                "{topic} {payload:?}"
            );
        }
    }
}
