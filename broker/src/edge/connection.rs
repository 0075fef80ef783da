//! One client connection: TLS handshake (with a timeout, in this connection's own task),
//! identity from the certificate, the CONNECT rules, then the pump between the socket and the
//! router link with the ACL applied to every PUBLISH, SUBSCRIBE and will.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleet_certs::{identity_from_der, Identity};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, LastWill, Packet, PingResp, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
    UnsubAckReason,
};
use rumqttd::Notification;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn, Instrument};

use super::codec::{decode, encode, publish_header};
use super::sessions::CloseReason;
use super::Shared;
use crate::acl::{Decision, DenyReason};
use crate::config::DeniedPublish;
use crate::metrics::Metrics;
use crate::ports::{SessionEvent, StatusVerdict};
use fleet_proto::topics::{self, DeviceTopic, Topic};

type Tls = TlsStream<TcpStream>;

/// Handles one accepted TCP connection to the end.
pub(crate) async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!(
        "conn",
        peer = %peer,
        identity = tracing::field::Empty,
        client_id = tracing::field::Empty
    );
    async move {
        let Some((tls, identity, cert)) = handshake(&shared, tcp).await else {
            return;
        };
        tracing::Span::current().record("identity", tracing::field::display(&identity));
        if let Err(reason) = session(shared.clone(), tls, identity, cert).await {
            debug!(%reason, "connection ended");
        }
    }
    .instrument(span)
    .await
}

async fn handshake(shared: &Shared, tcp: TcpStream) -> Option<(Tls, Identity, Vec<u8>)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls_config());
    let tls = match timeout(shared.config.tls.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            Metrics::inc(&shared.metrics.handshake_failures);
            info!(error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            Metrics::inc(&shared.metrics.handshake_failures);
            info!("TLS handshake timed out");
            return None;
        }
    };
    // Client authentication is mandatory, so a completed handshake has a verified chain.
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let Some(cert) = cert else {
        Metrics::inc(&shared.metrics.connects_refused);
        warn!("handshake completed without a client certificate");
        return None;
    };
    match identity_from_der(&cert, &shared.identity_policy) {
        Ok(identity) => Some((tls, identity, cert)),
        Err(e) => {
            Metrics::inc(&shared.metrics.connects_refused);
            warn!(error = %e, "certificate carries no usable identity");
            None
        }
    }
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT: no will.
    Graceful,
    /// The connection was lost or closed abnormally: the will is published.
    Abnormal(String),
    /// The router dropped the link (it already forgot the connection): the will is published.
    RouterGone,
}

async fn write_packets(wr: &mut WriteHalf<Tls>, packets: Vec<Packet>) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for p in packets {
        encode(p, &mut out).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    wr.write_all(&out).await?;
    wr.flush().await
}

async fn refuse(wr: &mut WriteHalf<Tls>, code: ConnectReturnCode) {
    let _ = write_packets(
        wr,
        vec![Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        )],
    )
    .await;
    let _ = wr.shutdown().await;
}

async fn session(
    shared: Arc<Shared>,
    tls: Tls,
    identity: Identity,
    cert: Vec<u8>,
) -> Result<(), String> {
    let max = shared.config.limits.max_packet_size;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut inbuf = BytesMut::with_capacity(4096);

    // CONNECT first, within the connect timeout.
    let first = timeout(shared.config.limits.connect_timeout, async {
        loop {
            // The first packet must be CONNECT: refuse anything else at its first byte.
            if inbuf.first().is_some_and(|b| *b != 0x10) {
                return Err("first packet is not CONNECT".to_owned());
            }
            if let Some(p) = decode(&mut inbuf, max).map_err(|e| e.to_string())? {
                return Ok::<_, String>(p);
            }
            if rd.read_buf(&mut inbuf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed before CONNECT".into());
            }
        }
    })
    .await;
    let first = match first {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            Metrics::inc(&shared.metrics.protocol_errors);
            warn!(error = %e, "bad first packet");
            return Err(e);
        }
        Err(_) => {
            Metrics::inc(&shared.metrics.connects_refused);
            info!("no CONNECT within the connect timeout");
            return Err("connect timeout".into());
        }
    };
    let Packet::Connect(connect, _, will, _, _) = first else {
        Metrics::inc(&shared.metrics.protocol_errors);
        warn!("first packet is not CONNECT");
        return Err("first packet not CONNECT".into());
    };

    // The client id is the certificate's id: an empty one is assigned, another is refused.
    // A service may run several connections, each as `{id}:{instance}`.
    let Some(client_id) = session_client_id(&identity, &connect.client_id) else {
        Metrics::inc(&shared.metrics.connects_refused);
        warn!(client_id = %connect.client_id, "client id differs from the certificate's id; refused");
        refuse(&mut wr, ConnectReturnCode::ClientIdentifierNotValid).await;
        return Err("client id mismatch".into());
    };
    tracing::Span::current().record("client_id", client_id.as_str());

    // The will is a publish like any other: the ACL decides now, not when it fires.
    if let Some(w) = &will {
        let topic = std::str::from_utf8(&w.topic).unwrap_or("");
        if let Decision::Deny(reason) = shared.policy().check_publish(&identity, topic) {
            Metrics::inc(&shared.metrics.acl_denials);
            warn!(topic, %reason, "will denied; connection refused");
            refuse(&mut wr, ConnectReturnCode::NotAuthorized).await;
            return Err("will denied".into());
        }
    }

    // One connection per identity: the previous one is closed and gone from the router first.
    let mut registration = shared.sessions.register(&client_id, cert).await;

    let router = shared.router.clone();
    let id = client_id.clone();
    let clean = connect.clean_session;
    let link = tokio::task::spawn_blocking(move || router.link(&id, clean)).await;
    let crate::router::Link {
        tx: link_tx,
        rx: mut link_rx,
        connack,
    } = match link {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            warn!(error = %e, "router refused the connection");
            refuse(&mut wr, ConnectReturnCode::ServiceUnavailable).await;
            return Err("router refused".into());
        }
        Err(e) => return Err(format!("link task failed: {e}")),
    };
    let session_present = matches!(
        &connack,
        Some(Packet::ConnAck(ack, _)) if ack.session_present
    );
    if let Some(p) = connack {
        write_packets(&mut wr, vec![p])
            .await
            .map_err(|e| e.to_string())?;
    }
    shared.session_event(
        &identity,
        SessionEvent::Connected {
            id: identity.id.clone(),
            session_present,
        },
    );
    Metrics::inc(&shared.metrics.sessions_opened);
    info!(
        clean_session = clean,
        keep_alive = connect.keep_alive,
        "session open"
    );

    let mut pump = Pump {
        shared: shared.clone(),
        identity,
        link_tx,
        pending_subacks: HashMap::new(),
        denied_qos2: HashSet::new(),
        out: Vec::new(),
    };
    let end = pump
        .run(
            &mut rd,
            &mut wr,
            &mut inbuf,
            &mut link_rx,
            &mut registration,
            connect.keep_alive,
        )
        .await;

    match &end {
        End::Graceful => info!("client disconnected"),
        End::Abnormal(why) => info!(reason = %why, "connection lost"),
        End::RouterGone => info!("router dropped the connection"),
    }
    if !matches!(end, End::RouterGone) {
        // Remove the connection from the router (it keeps a persistent session's state).
        let _ = pump
            .link_tx
            .send(Packet::Disconnect(disconnect_packet(), None))
            .await;
    }
    if !matches!(end, End::Graceful) {
        if let Some(w) = will {
            shared.publish_will(&pump.identity, w).await;
        }
    }
    shared.session_event(
        &pump.identity,
        SessionEvent::Disconnected {
            id: pump.identity.id.clone(),
        },
    );
    let _ = wr.shutdown().await;
    drop(registration);
    Ok(())
}

/// Most bytes of the instance part of a service's client id (`{id}:{instance}`).
pub(crate) const MAX_INSTANCE_LEN: usize = 32;

/// The client id a connection gets: the certificate's id (asked for, or assigned when empty),
/// or for a service `{id}:{instance}` with an instance of 1-32 ASCII letters, digits, `-` or
/// `_`, so that several processes of one service can be connected at once. `None`: refused.
pub(crate) fn session_client_id(identity: &Identity, asked: &str) -> Option<String> {
    if asked.is_empty() || asked == identity.id {
        return Some(identity.id.clone());
    }
    let instance = asked
        .strip_prefix(identity.id.as_str())?
        .strip_prefix(':')?;
    let ok = identity.role == fleet_certs::Role::Service
        && (1..=MAX_INSTANCE_LEN).contains(&instance.len())
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| asked.to_owned())
}

fn disconnect_packet() -> rumqttd::protocol::Disconnect {
    rumqttd::protocol::Disconnect {
        reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
    }
}

/// What a packet from the client leads to.
enum Step {
    Continue,
    Stop(End),
}

struct Pump {
    shared: Arc<Shared>,
    identity: Identity,
    link_tx: LinkTx,
    /// SUBSCRIBEs with denied filters: the full list of return codes, `None` where the router
    /// answers.
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// QoS 2 publishes that were denied and answered with PUBREC here.
    denied_qos2: HashSet<u16>,
    /// Packets to write to the client at the next flush.
    out: Vec<Packet>,
}

/// Most notifications taken from the router before writing to the socket.
const WRITE_BATCH: usize = 64;

impl Pump {
    async fn run(
        &mut self,
        rd: &mut ReadHalf<Tls>,
        wr: &mut WriteHalf<Tls>,
        inbuf: &mut BytesMut,
        link_rx: &mut LinkRx,
        registration: &mut super::sessions::Registration,
        keep_alive: u16,
    ) -> End {
        let super::sessions::Registration { close, direct, .. } = registration;
        // MQTT 3.1.1: the server closes a connection silent for 1.5 x keep-alive (0: never).
        let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let far = Duration::from_secs(365 * 24 * 3600);
        let mut deadline = Instant::now() + idle.unwrap_or(far);
        let max = self.shared.config.limits.max_packet_size;
        loop {
            tokio::select! {
                biased;
                changed = close.changed() => {
                    let reason = if changed.is_ok() { *close.borrow() } else { Some(CloseReason::Shutdown) };
                    if let Some(reason) = reason {
                        return End::Abnormal(format!("closed by the gateway: {reason}"));
                    }
                }
                read = rd.read_buf(inbuf) => {
                    match read {
                        Ok(0) => return End::Abnormal("connection closed by peer".into()),
                        Ok(_) => {}
                        Err(e) => return End::Abnormal(format!("read error: {e}")),
                    }
                    deadline = Instant::now() + idle.unwrap_or(far);
                    loop {
                        let header = publish_header(inbuf);
                        match decode(inbuf, max) {
                            Ok(Some(packet)) => {
                                if let Step::Stop(end) = self.on_packet(packet, header).await {
                                    let _ = self.flush(wr).await;
                                    return end;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                Metrics::inc(&self.shared.metrics.protocol_errors);
                                warn!(error = %e, "closing connection");
                                return End::Abnormal(e.to_string());
                            }
                        }
                    }
                    if let Err(e) = self.flush(wr).await {
                        return End::Abnormal(format!("write error: {e}"));
                    }
                }
                notification = link_rx.next() => {
                    let mut wake = false;
                    let mut next = notification;
                    let mut taken = 0;
                    loop {
                        match next {
                            Ok(Some(n)) => match self.on_notification(n) {
                                Some(true) => wake = true,
                                Some(false) => {}
                                None => { let _ = self.flush(wr).await; return End::RouterGone; }
                            },
                            Ok(None) => {}
                            Err(_) => { let _ = self.flush(wr).await; return End::RouterGone; }
                        }
                        taken += 1;
                        if taken == WRITE_BATCH {
                            break;
                        }
                        // Take what the router has already queued, without waiting. Only
                        // fetch what this loop will also process: nothing may be dropped.
                        match timeout(Duration::ZERO, link_rx.next()).await {
                            Ok(n) => next = n,
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.flush(wr).await {
                        return End::Abnormal(format!("write error: {e}"));
                    }
                    if wake && link_rx.wake().await.is_err() {
                        return End::RouterGone;
                    }
                }
                Some(packet) = direct.recv() => {
                    // Bulk data from a service (firmware chunks): batched like the router's.
                    Metrics::inc(&self.shared.metrics.publishes_out);
                    self.out.push(packet);
                    while self.out.len() < WRITE_BATCH {
                        match direct.try_recv() {
                            Ok(p) => {
                                Metrics::inc(&self.shared.metrics.publishes_out);
                                self.out.push(p);
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.flush(wr).await {
                        return End::Abnormal(format!("write error: {e}"));
                    }
                }
                _ = sleep_until(deadline), if idle.is_some() => {
                    info!(keep_alive, "keep-alive expired");
                    return End::Abnormal("keep-alive expired".into());
                }
            }
        }
    }

    async fn flush(&mut self, wr: &mut WriteHalf<Tls>) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        write_packets(wr, std::mem::take(&mut self.out)).await
    }

    async fn forward(&mut self, packet: Packet) -> Step {
        match self.link_tx.send(packet).await {
            Ok(_) => Step::Continue,
            Err(_) => Step::Stop(End::RouterGone),
        }
    }

    fn violation(&self, what: String) -> Step {
        Metrics::inc(&self.shared.metrics.protocol_errors);
        warn!(reason = %what, "protocol violation; closing connection");
        Step::Stop(End::Abnormal(what))
    }

    async fn on_packet(&mut self, packet: Packet, header: Option<(u8, u16)>) -> Step {
        match packet {
            Packet::Publish(publish, _) => {
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    return self.violation("publish topic is not UTF-8".into());
                };
                match self.shared.policy().check_publish(&self.identity, topic) {
                    Decision::Allow => {
                        Metrics::inc(&self.shared.metrics.publishes_in);
                        if self.identity.role == fleet_certs::Role::Device {
                            if let Some(step) =
                                self.store_status(topic, &publish.payload, header).await
                            {
                                return step;
                            }
                        }
                        self.forward(Packet::Publish(publish, None)).await
                    }
                    Decision::Deny(DenyReason::Syntax(e)) => {
                        self.violation(format!("invalid publish topic {topic:?}: {e}"))
                    }
                    Decision::Deny(reason) => {
                        Metrics::inc(&self.shared.metrics.acl_denials);
                        warn!(topic, retain = publish.retain, %reason, "publish denied");
                        if self.shared.config.acl.on_denied_publish == DeniedPublish::Disconnect {
                            return Step::Stop(End::Abnormal(format!("publish to {topic} denied")));
                        }
                        self.ack_dropped(header);
                        Step::Continue
                    }
                }
            }
            Packet::Subscribe(subscribe, _) => self.on_subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe, props) => {
                // rumqttd answers only for filters it had; answer here, for all of them.
                let ack = UnsubAck {
                    pkid: unsubscribe.pkid,
                    reasons: vec![UnsubAckReason::Success; unsubscribe.filters.len()],
                };
                self.out.push(Packet::UnsubAck(ack, None));
                self.forward(Packet::Unsubscribe(unsubscribe, props)).await
            }
            Packet::PubRel(pubrel, _) if self.denied_qos2.remove(&pubrel.pkid) => {
                self.out.push(Packet::PubComp(
                    PubComp {
                        pkid: pubrel.pkid,
                        reason: PubCompReason::Success,
                    },
                    None,
                ));
                Step::Continue
            }
            p @ (Packet::PubAck(..)
            | Packet::PubRec(..)
            | Packet::PubRel(..)
            | Packet::PubComp(..)) => self.forward(p).await,
            Packet::PingReq(_) => {
                self.out.push(Packet::PingResp(PingResp));
                Step::Continue
            }
            Packet::Disconnect(..) => Step::Stop(End::Graceful),
            Packet::Connect(..) => self.violation("second CONNECT".into()),
            other => self.violation(format!(
                "unexpected packet from a client: {}",
                packet_name(&other)
            )),
        }
    }

    async fn on_subscribe(&mut self, subscribe: Subscribe) -> Step {
        let pkid = subscribe.pkid;
        let mut slots = Vec::with_capacity(subscribe.filters.len());
        let mut allowed = Vec::new();
        for f in subscribe.filters {
            match self
                .shared
                .policy()
                .check_subscribe(&self.identity, &f.path)
            {
                Decision::Allow => {
                    slots.push(None);
                    allowed.push(f);
                }
                Decision::Deny(DenyReason::Syntax(e)) => {
                    return self.violation(format!("invalid topic filter {:?}: {e}", f.path));
                }
                Decision::Deny(reason) => {
                    Metrics::inc(&self.shared.metrics.acl_denials);
                    warn!(filter = %f.path, %reason, "subscription denied");
                    slots.push(Some(SubscribeReasonCode::Failure));
                }
            }
        }
        if allowed.is_empty() {
            let codes = slots
                .into_iter()
                .map(|s| s.unwrap_or(SubscribeReasonCode::Failure))
                .collect();
            self.out.push(Packet::SubAck(
                SubAck {
                    pkid,
                    return_codes: codes,
                },
                None,
            ));
            return Step::Continue;
        }
        if slots.iter().any(Option::is_some) {
            self.pending_subacks.insert(pkid, slots);
        }
        let granted: Vec<String> = allowed.iter().map(|f| f.path.clone()).collect();
        let step = self
            .forward(Packet::Subscribe(
                Subscribe {
                    pkid,
                    filters: allowed,
                },
                None,
            ))
            .await;
        // After the router has the SUBSCRIBE queued: what a service publishes next reaches it.
        self.shared.session_event(
            &self.identity,
            SessionEvent::Subscribed {
                id: self.identity.id.clone(),
                filters: granted,
            },
        );
        step
    }

    /// Acknowledges a publish that is not forwarded (denied, malformed, duplicate), so the
    /// client does not send it again forever.
    fn ack_dropped(&mut self, header: Option<(u8, u16)>) {
        match header {
            Some((1, pkid)) => self.out.push(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )),
            Some((2, pkid)) => {
                self.denied_qos2.insert(pkid);
                self.out.push(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ));
            }
            _ => {}
        }
    }

    /// A device's status report goes to the status owner before it may be acknowledged.
    /// `None`: stored, forward it (the router acknowledges it); `Some(step)`: handled here
    /// (malformed or duplicate: acknowledged and dropped; store failure: the connection closes
    /// and the device sends it again later).
    async fn store_status(
        &mut self,
        topic: &str,
        payload: &Bytes,
        header: Option<(u8, u16)>,
    ) -> Option<Step> {
        let Ok(Topic::Device {
            id,
            kind: DeviceTopic::Status,
        }) = topics::parse(topic)
        else {
            return None;
        };
        match self.shared.status.offer(id.as_str(), payload.clone()).await {
            StatusVerdict::Stored => None,
            StatusVerdict::Dropped => {
                self.ack_dropped(header);
                Some(Step::Continue)
            }
            StatusVerdict::Failed => Some(Step::Stop(End::Abnormal(
                "status report could not be stored".into(),
            ))),
        }
    }

    /// Queues what the router sent. Returns whether the router must be woken (it unscheduled
    /// this connection), or `None` if the router dropped the connection.
    fn on_notification(&mut self, n: Notification) -> Option<bool> {
        match n {
            Notification::Forward(f) => {
                Metrics::inc(&self.shared.metrics.publishes_out);
                self.out.push(Packet::Publish(f.publish, None));
            }
            Notification::DeviceAck(ack) => {
                let packet: Packet = ack.into();
                match packet {
                    // Answered already when the UNSUBSCRIBE arrived.
                    Packet::UnsubAck(..) => {}
                    Packet::SubAck(mut suback, _) => {
                        if let Some(slots) = self.pending_subacks.remove(&suback.pkid) {
                            let mut routed = suback.return_codes.into_iter();
                            suback.return_codes = slots
                                .into_iter()
                                .map(|s| {
                                    s.or_else(|| routed.next())
                                        .unwrap_or(SubscribeReasonCode::Failure)
                                })
                                .collect();
                        }
                        self.out.push(Packet::SubAck(suback, None));
                    }
                    other => self.out.push(other),
                }
            }
            Notification::Unschedule => return Some(true),
            Notification::Disconnect(..) => return None,
            _ => {}
        }
        Some(false)
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::Publish(..) => "PUBLISH",
        Packet::PubAck(..) => "PUBACK",
        Packet::PingReq(..) => "PINGREQ",
        Packet::PingResp(..) => "PINGRESP",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::Disconnect(..) => "DISCONNECT",
    }
}

/// A will to publish, as the router link takes it.
pub(crate) fn will_packet(w: LastWill) -> Packet {
    let LastWill {
        topic,
        message,
        retain,
        ..
    } = w;
    Packet::Publish(
        rumqttd::protocol::Publish::new::<Bytes>(topic, message, retain),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_certs::Role;

    #[test]
    fn client_ids_are_bound_to_the_certificate() {
        let dev = Identity::new(Role::Device, "dev-1").unwrap_or_else(|e| panic!("{e}"));
        let svc = Identity::new(Role::Service, "svc-1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(session_client_id(&dev, "").as_deref(), Some("dev-1"));
        assert_eq!(session_client_id(&dev, "dev-1").as_deref(), Some("dev-1"));
        assert_eq!(
            session_client_id(&svc, "svc-1:a1-b_2").as_deref(),
            Some("svc-1:a1-b_2")
        );
        for (who, asked) in [
            (&dev, "dev-2"),
            (&dev, "dev-1:x"),
            (&svc, "svc-2:x"),
            (&svc, "svc-1:"),
            (&svc, "svc-1x"),
            (&svc, "svc-1:a:b"),
            (&svc, "svc-1:a b"),
            (&svc, &format!("svc-1:{}", "x".repeat(33))),
        ] {
            assert_eq!(session_client_id(who, asked), None, "{asked}");
        }
    }
}
