//! The status registry: the last StatusReport and Presence of every device, persisted.
//!
//! It reads `devices/+/status` and `devices/+/presence` from its own link. The device id comes
//! from the topic, which the edge's ACL guarantees is the publisher's own. Reports are written
//! in batches (whatever arrived while the previous batch was being written, up to
//! [`MAX_BATCH`]) so one disk sync covers many reports; the per-device sequence drops duplicates.

use std::sync::Arc;

use fleet_proto::topics::{self, DeviceTopic, Topic};
use fleet_proto::v1::{Presence, PresenceState, StatusReport};
use fleet_proto::Message;
use tracing::{debug, info, warn};

use super::link::{LinkError, Received, ServiceLink};
use super::SharedStore;
use crate::metrics::Metrics;
use crate::router::RouterHandle;
use crate::store::{StatusOutcome, StatusWrite};

/// Most reports written in one transaction.
pub const MAX_BATCH: usize = 512;

/// The registry task.
pub struct Registry {
    link: ServiceLink,
    store: SharedStore,
    metrics: Arc<Metrics>,
}

/// One decoded, checked message for the registry.
enum Item {
    Status {
        device: String,
        sequence: u64,
        class: String,
        bytes: Vec<u8>,
    },
    Presence {
        device: String,
        class: String,
        bytes: Vec<u8>,
    },
}

/// Why a registry message is refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("not a device status or presence topic")]
    Topic,
    #[error("bad protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0}")]
    Invalid(&'static str),
}

/// Checks one message: pure, so the rules are testable without a router.
fn classify(msg: &Received) -> Result<Item, Refused> {
    let Ok(Topic::Device { id, kind }) = topics::parse(&msg.topic) else {
        return Err(Refused::Topic);
    };
    let device = id.to_string();
    match kind {
        DeviceTopic::Status => {
            let r = StatusReport::decode(msg.payload.as_ref())?;
            if r.sequence == 0 {
                return Err(Refused::Invalid("status report without a sequence"));
            }
            Ok(Item::Status {
                device,
                sequence: r.sequence,
                class: r.device_class,
                bytes: msg.payload.to_vec(),
            })
        }
        DeviceTopic::Presence => {
            let p = Presence::decode(msg.payload.as_ref())?;
            if !matches!(p.state(), PresenceState::Online | PresenceState::Offline) {
                return Err(Refused::Invalid("presence without a state"));
            }
            Ok(Item::Presence {
                device,
                class: p.device_class,
                bytes: msg.payload.to_vec(),
            })
        }
        _ => Err(Refused::Topic),
    }
}

impl Registry {
    /// Opens the registry's link.
    pub async fn start(
        router: &RouterHandle,
        store: SharedStore,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LinkError> {
        let status = topics::all_devices_filter(DeviceTopic::Status);
        let presence = topics::all_devices_filter(DeviceTopic::Presence);
        let link = ServiceLink::open(router, "registry", &[&status, &presence]).await?;
        Ok(Registry {
            link,
            store,
            metrics,
        })
    }

    /// Runs until the router is gone.
    pub async fn run(mut self) {
        while let Some(first) = self.link.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.link.try_recv().await {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            self.write(batch).await;
        }
        info!("status registry stopped");
    }

    async fn write(&mut self, batch: Vec<Received>) {
        let mut items = Vec::with_capacity(batch.len());
        for msg in &batch {
            match classify(msg) {
                Ok(item) => items.push(item),
                Err(e) => {
                    Metrics::inc(&self.metrics.malformed_payloads);
                    warn!(topic = %msg.topic, error = %e, "registry: message dropped");
                }
            }
        }
        if items.is_empty() {
            return;
        }
        let now = fleet_proto::time::now_ms();
        let outcome = self
            .store
            .call("registry write", move |s| {
                let writes: Vec<StatusWrite<'_>> = items
                    .iter()
                    .filter_map(|i| match i {
                        Item::Status {
                            device,
                            sequence,
                            class,
                            bytes,
                        } => Some(StatusWrite {
                            device_id: device,
                            sequence: *sequence,
                            report: bytes,
                            device_class: Some(class),
                        }),
                        Item::Presence { .. } => None,
                    })
                    .collect();
                let outcomes = s.put_statuses(&writes, now)?;
                for i in &items {
                    if let Item::Presence {
                        device,
                        class,
                        bytes,
                    } = i
                    {
                        s.put_presence(device, bytes, now)?;
                        s.set_device_class(device, class)?;
                    }
                }
                Ok(outcomes)
            })
            .await;
        if let Ok(outcomes) = outcome {
            for o in outcomes {
                match o {
                    StatusOutcome::Stored => Metrics::inc(&self.metrics.status_stored),
                    StatusOutcome::Stale { stored } => {
                        Metrics::inc(&self.metrics.status_duplicates);
                        debug!(stored, "registry: duplicate or late report not stored");
                    }
                }
            }
        }
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
            classify(&msg("devices/dev-1/status", ok)),
            Ok(Item::Status { sequence: 3, .. })
        ));
        for (topic, payload) in [
            ("devices/dev-1/status", vec![0xff, 0xff, 0xff]),
            ("devices/dev-1/status", Vec::new()),
            (
                "devices/dev-1/presence",
                Presence::default().encode_to_vec(),
            ),
            ("devices/dev-1/presence", vec![0x08]),
            ("devices/dev-1/cmd", Vec::new()),
            ("elsewhere", Vec::new()),
        ] {
            assert!(
                classify(&msg(topic, payload.clone())).is_err(),
                "{topic} {payload:?}"
            );
        }
    }
}
