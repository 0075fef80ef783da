//! A service's in-process link into the MQTT core: an ordinary session of the `Internal` role,
//! without a socket. It subscribes at QoS 1, receives publishes, and publishes at QoS 1.
//!
//! Most links are clean sessions that acknowledge each publish as they take it into memory.
//! A durable link ([`ServiceLink::open_durable`]) is a persistent session that acknowledges a
//! publish only when its service says it is safe ([`ServiceLink::confirm`]): the core keeps the
//! message in the session's stored queue until then, and a restarted gateway delivers it again.

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

/// How long a link waits for the answer to its subscription (a persistent session's comes
/// once the store has made it durable).
const SUBACK_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Most bytes taken from the core at once.
const PULL_BYTES: usize = 1 << 20;

pub(crate) struct ServiceLink {
    name: String,
    router: Router,
    port: Port,
    /// Received publishes and, on a durable link, the packet id to confirm.
    inbox: VecDeque<(Received, Option<u16>)>,
    durable: bool,
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
        Self::open_session(router, name, filters, false).await
    }

    /// Opens the durable link of service `name`: a persistent session, resumed if the store
    /// kept it, subscribed to `filters` at QoS 1. Its QoS 1 publishes are acknowledged only
    /// through [`ServiceLink::confirm`] (received with [`ServiceLink::recv_unconfirmed`]), so
    /// the core holds each in the session's stored queue until the service has made it safe;
    /// after a restart it delivers again whatever was not confirmed. The core answers the
    /// publisher only once that queue write is durable. The session outlives the link (and
    /// keeps receiving, up to the core's offline caps) until a clean link of the same name
    /// replaces it.
    pub(crate) async fn open_durable(
        router: &Router,
        name: &str,
        filters: &[&str],
    ) -> Result<Self, LinkError> {
        Self::open_session(router, name, filters, true).await
    }

    async fn open_session(
        router: &Router,
        name: &str,
        filters: &[&str],
        durable: bool,
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
                clean_session: !durable,
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
            durable,
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
        // A persistent session's SUBACK waits until its subscription is durable.
        let wait = tokio::time::timeout(SUBACK_WITHIN, async {
            loop {
                this.pull(|p| {
                    if let Packet::SubAck(s) = p {
                        suback = Some(s.codes.clone());
                    }
                });
                if suback.is_some() || this.port.closed().is_some() {
                    return;
                }
                let wake = this.port.wake.clone();
                wake.notified().await;
            }
        });
        if wait.await.is_err() {
            return Err(fail(format!(
                "no answer to its subscription within {SUBACK_WITHIN:?}"
            )));
        }
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
    /// once: the link has taken them; on a durable link, QoS 1 ones wait for
    /// [`ServiceLink::confirm`]), acknowledgements of its own publishes are counted, anything
    /// else goes to `other`.
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
                        let mut confirm = None;
                        match (qos, packet_id) {
                            (QoS::AtLeastOnce, Some(id)) if self.durable => confirm = Some(id),
                            (QoS::AtLeastOnce, Some(id)) => {
                                self.router.packet(&self.port, Packet::PubAck(id))
                            }
                            // Links subscribe at QoS 1: the core never sends them QoS 2.
                            (QoS::ExactlyOnce, Some(id)) => {
                                self.router.packet(&self.port, Packet::PubRec(id))
                            }
                            _ => {}
                        }
                        self.inbox.push_back((Received { topic, payload }, confirm));
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
        self.recv_unconfirmed().await.map(|(r, _)| r)
    }

    /// The next publish routed to this link and, on a durable link, the packet id to pass to
    /// [`ServiceLink::confirm`] once the service has made the message safe (`None`: nothing
    /// to confirm); `None` when the core closed the link.
    pub(crate) async fn recv_unconfirmed(&mut self) -> Option<(Received, Option<u16>)> {
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

    /// Acknowledges a publish received on a durable link: the core removes it from the
    /// session's queue (it is not delivered again after a restart).
    pub(crate) fn confirm(&mut self, packet_id: u16) {
        self.router.packet(&self.port, Packet::PubAck(packet_id));
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
