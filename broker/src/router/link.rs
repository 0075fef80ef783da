//! A service's in-process link into the router: subscribe, receive publishes, publish.

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;

use super::{RouterHandle, INTERNAL_PREFIX};

/// The router refused the service's link or dropped it.
#[derive(Debug, thiserror::Error)]
#[error("service link {name}: {reason}")]
pub struct LinkError {
    name: String,
    reason: String,
}

/// One publish received by a service.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
}

pub(crate) struct ServiceLink {
    name: String,
    tx: LinkTx,
    rx: LinkRx,
}

impl ServiceLink {
    /// Opens the link `INTERNAL_PREFIX{name}` (clean session) and subscribes to `filters`.
    pub(crate) async fn open(
        router: &RouterHandle,
        name: &str,
        filters: &[&str],
    ) -> Result<Self, LinkError> {
        let fail = |reason: String| LinkError {
            name: name.to_owned(),
            reason,
        };
        let router = router.clone();
        let client_id = format!("{INTERNAL_PREFIX}{name}");
        let link = tokio::task::spawn_blocking(move || router.link(&client_id, true))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
        let mut this = ServiceLink {
            name: name.to_owned(),
            tx: link.tx,
            rx: link.rx,
        };
        for f in filters {
            this.tx
                .subscribe(*f)
                .map_err(|e| fail(format!("subscribe {f}: {e}")))?;
        }
        Ok(this)
    }

    /// The next publish routed to this link; `None` when the router is gone.
    pub(crate) async fn recv(&mut self) -> Option<Received> {
        loop {
            match self.rx.next().await {
                Ok(Some(Notification::Forward(f))) => {
                    return Some(Received {
                        topic: String::from_utf8_lossy(&f.publish.topic).into_owned(),
                        payload: f.publish.payload,
                    })
                }
                // The router stops sending when the link's buffer is full; ask it to go on.
                Ok(Some(Notification::Unschedule)) => {
                    if self.rx.wake().await.is_err() {
                        return None;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(link = %self.name, error = %e, "router dropped a service link");
                    return None;
                }
            }
        }
    }

    /// Publishes `payload` on `topic` (not retained). Subscribers get it at their
    /// subscription's QoS.
    pub(crate) fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), LinkError> {
        self.tx
            .publish(topic, payload)
            .map(|_| ())
            .map_err(|e| LinkError {
                name: self.name.clone(),
                reason: e.to_string(),
            })
    }

    /// Publishes `payload` retained on `topic`; an empty payload clears the retained message.
    pub(crate) async fn publish_retained(
        &mut self,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), LinkError> {
        let publish = rumqttd::protocol::Publish::new::<Bytes>(topic.into(), payload.into(), true);
        self.tx
            .send(rumqttd::protocol::Packet::Publish(publish, None))
            .await
            .map(|_| ())
            .map_err(|e| LinkError {
                name: self.name.clone(),
                reason: e.to_string(),
            })
    }
}
