//! A service's in-process link into the MQTT core: an ordinary clean session of the `Internal`
//! role, without a socket. It subscribes at QoS 1, receives publishes (acknowledging each as
//! it takes it), and publishes at QoS 1.

use std::collections::VecDeque;

use bytes::Bytes;
use fleet_mqtt::{
    ConnAck, Connect, ConnectCode, Packet, Publish, QoS, Role, SessionKey, SubAckCode, Subscribe,
};
use tracing::{error, warn};

use super::{Port, Router};

/// The core refused the service's link.
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

/// QoS 1 publishes of a link not yet acknowledged by the core, above which it publishes at
/// QoS 0 instead: the core holds back the acknowledgement of a publish for a full queue, and a
/// service must neither wait on one stalled device nor reach the core's cap on held publishes
/// (which would close its link). A QoS 0 publish for a full queue is dropped and counted; the
/// services re-send what matters (commands until their result, manifests are retained).
const MAX_UNACKED: usize = 48;

/// Most bytes taken from the core at once.
const PULL_BYTES: usize = 1 << 20;

pub(crate) struct ServiceLink {
    name: String,
    router: Router,
    port: Port,
    inbox: VecDeque<Received>,
    next_id: u16,
    unacked: usize,
    out: Vec<Packet>,
}

impl Drop for ServiceLink {
    fn drop(&mut self) {
        self.router
            .disconnected(&self.port, fleet_mqtt::Disconnected::Graceful);
    }
}

impl ServiceLink {
    /// Opens the link of service `name` (a clean session) and subscribes to `filters` at QoS 1.
    pub(crate) async fn open(
        router: &Router,
        name: &str,
        filters: &[&str],
    ) -> Result<Self, LinkError> {
        let fail = |reason: String| LinkError {
            name: name.to_owned(),
            reason,
        };
        let port = router.attach();
        let key = SessionKey {
            role: Role::Internal,
            id: name.to_owned(),
            instance: None,
        };
        router.connect(
            &port,
            key,
            Connect {
                level: 4,
                clean_session: true,
                keep_alive: 0,
                client_id: name.to_owned(),
                will: None,
                username: None,
                password: None,
            },
        );
        let mut this = ServiceLink {
            name: name.to_owned(),
            router: router.clone(),
            port,
            inbox: VecDeque::new(),
            next_id: 0,
            unacked: 0,
            out: Vec::new(),
        };
        let mut connack = None;
        let mut suback = None;
        this.pull(|p| match p {
            Packet::ConnAck(a) => connack = Some(*a),
            Packet::SubAck(s) => suback = Some(s.codes.clone()),
            _ => {}
        });
        if !matches!(
            connack,
            Some(ConnAck {
                code: ConnectCode::Accepted,
                ..
            })
        ) {
            return Err(fail(format!("not accepted: {connack:?}")));
        }
        if filters.is_empty() {
            return Ok(this);
        }
        let packet_id = this.packet_id();
        this.router.packet(
            &this.port,
            Packet::Subscribe(Subscribe {
                packet_id,
                filters: filters
                    .iter()
                    .map(|f| ((*f).to_owned(), QoS::AtLeastOnce))
                    .collect(),
            }),
        );
        this.pull(|p| {
            if let Packet::SubAck(s) = p {
                suback = Some(s.codes.clone());
            }
        });
        match suback {
            Some(codes) if codes.iter().all(|c| matches!(c, SubAckCode::Granted(_))) => Ok(this),
            other => Err(fail(format!("subscription refused: {other:?}"))),
        }
    }

    fn packet_id(&mut self) -> u16 {
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        self.next_id
    }

    /// Takes what the core has for this link: publishes go to the inbox (acknowledged at
    /// once: the link has taken them), acknowledgements of its own publishes are counted,
    /// anything else goes to `other`.
    fn pull(&mut self, mut other: impl FnMut(&Packet)) {
        loop {
            self.out.clear();
            let mut out = std::mem::take(&mut self.out);
            self.router.transmit(&self.port, PULL_BYTES, &mut out);
            if out.is_empty() {
                self.out = out;
                return;
            }
            for p in out.drain(..) {
                match p {
                    Packet::Publish(Publish {
                        topic,
                        payload,
                        qos,
                        packet_id,
                        ..
                    }) => {
                        match (qos, packet_id) {
                            (QoS::AtLeastOnce, Some(id)) => {
                                self.router.packet(&self.port, Packet::PubAck(id))
                            }
                            (QoS::ExactlyOnce, Some(id)) => {
                                self.router.packet(&self.port, Packet::PubRec(id))
                            }
                            _ => {}
                        }
                        self.inbox.push_back(Received { topic, payload });
                    }
                    Packet::PubRel(id) => self.router.packet(&self.port, Packet::PubComp(id)),
                    Packet::PubAck(_) => self.unacked = self.unacked.saturating_sub(1),
                    p => other(&p),
                }
            }
            self.out = out;
        }
    }

    /// The next publish routed to this link; `None` when the core closed the link.
    pub(crate) async fn recv(&mut self) -> Option<Received> {
        loop {
            if let Some(r) = self.inbox.pop_front() {
                return Some(r);
            }
            if let Some(reason) = self.port.closed() {
                error!(link = %self.name, ?reason, "the MQTT core closed a service link");
                return None;
            }
            self.pull(|_| {});
            if self.inbox.is_empty() {
                let wake = self.port.wake.clone();
                wake.notified().await;
            }
        }
    }

    fn send(&mut self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), LinkError> {
        if let Some(reason) = self.port.closed() {
            return Err(LinkError {
                name: self.name.clone(),
                reason: format!("closed by the MQTT core: {reason:?}"),
            });
        }
        self.pull(|_| {});
        let (qos, packet_id) = if self.unacked < MAX_UNACKED {
            self.unacked += 1;
            (QoS::AtLeastOnce, Some(self.packet_id()))
        } else {
            warn!(link = %self.name, topic, "subscribers slow to take the link's publishes; publishing at QoS 0");
            (QoS::AtMostOnce, None)
        };
        self.router.packet(
            &self.port,
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic,
                packet_id,
                payload: payload.into(),
            }),
        );
        Ok(())
    }

    /// Publishes `payload` on `topic` (not retained) at QoS 1: subscribers get it at
    /// min(1, their subscription's QoS).
    pub(crate) fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), LinkError> {
        self.send(topic, payload, false)
    }

    /// Publishes `payload` retained on `topic`; an empty payload clears the retained message.
    pub(crate) async fn publish_retained(
        &mut self,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), LinkError> {
        self.send(topic, payload, true)
    }
}
