//! The status registry's presence reader: the last Presence of every device (and its class),
//! persisted from the registry's own link on `devices/+/presence`. Status reports take another
//! path: the edge offers them to [`super::status`] before they are acknowledged.
//!
//! The device id comes from the topic, which the edge's ACL guarantees is the publisher's own.

use std::sync::Arc;

use fleet_proto::topics::{self, DeviceTopic, Topic};
use fleet_proto::v1::{Presence, PresenceState};
use fleet_proto::Message;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::router::Router;
use crate::router::{LinkError, Received, ServiceLink};
use crate::store::SharedStore;

/// Why a payload is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
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

/// A checked presence message.
pub(crate) struct PresenceItem {
    device: String,
    class: String,
    bytes: Vec<u8>,
}

pub(crate) fn presence_item(msg: &Received) -> Result<PresenceItem, Refused> {
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

/// The presence reader task.
pub(crate) struct Registry {
    link: ServiceLink,
    store: SharedStore,
    metrics: Arc<Metrics>,
}

impl Registry {
    /// Opens the registry's link.
    pub(crate) async fn start(
        router: &Router,
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
    pub(crate) async fn run(mut self) {
        while let Some(msg) = self.link.recv().await {
            let item = match presence_item(&msg) {
                Ok(i) => i,
                Err(e) => {
                    if let Some(suppressed) = self.metrics.malformed_payload() {
                        warn!(topic = %msg.topic, error = %e, suppressed, "registry: message dropped");
                    }
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
