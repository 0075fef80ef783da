//! One client connection: TLS handshake (with a timeout, in this connection's own task),
//! identity from the certificate, the CONNECT rules the edge owns (client id bound to the
//! certificate, the certificate checked against the current CRL), then the pump between the
//! socket and the MQTT core. The core applies the ACL, QoS and queues; the edge decodes with
//! the strict codec, offers device status reports to the status owner before the core sees
//! them, and writes what the core has for the client with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleet_certs::{identity_from_der, Identity};
use fleet_mqtt::codec::{encode, DecodeError, Decoder};
use fleet_mqtt::{ConnAck, ConnectCode, Disconnected, Packet, Publish, QoS, Role, SessionKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, warn, Instrument};

use super::preauth::Ticket;
use super::sessions::CloseReason;
use super::tls_stream::TlsStream;
use super::Shared;
use crate::acl::Decision;
use crate::metrics::Metrics;
use crate::ports::{SessionEvent, StatusVerdict};
use crate::router::Port;
use fleet_proto::topics::{self, DeviceTopic, Topic};

type Tls = TlsStream;

/// Handles one accepted TCP connection to the end. `ticket` is its pre-authentication slot
/// (dropped once CONNECT is handled; the connection is dropped if it is evicted first);
/// `slots` are the authenticated sessions' slots.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
    slots: Arc<Semaphore>,
) {
    let span = tracing::info_span!(
        "conn",
        peer = %peer,
        identity = tracing::field::Empty,
        client_id = tracing::field::Empty
    );
    async move {
        let evicted = ticket.evicted.clone();
        let pre = async {
            // The trust material the handshake verifies against: if a reload replaces it
            // before CONNECT, the certificate is verified again then.
            let trusted_as_of = shared.trust_generation();
            let (tls, identity, cert) = handshake(&shared, tcp).await?;
            tracing::Span::current().record("identity", tracing::field::display(&identity));
            opening(&shared, tls, identity, cert, trusted_as_of).await
        };
        // Boxed, so the handshake's state is freed once it is over instead of sizing the
        // connection's task for its whole life (memory per idle connection).
        let opened = tokio::select! {
            o = Box::pin(pre) => o,
            () = evicted.notified() => {
                debug!("pending connection dropped for a newer one");
                None
            }
        };
        drop(ticket);
        let Some(mut opened) = opened else {
            return;
        };
        let Ok(permit) = slots.try_acquire_owned() else {
            Metrics::inc(&shared.metrics.connects_refused);
            warn!("max_connections reached; CONNACK 0x03");
            Box::pin(refuse(
                &mut opened.wr,
                ConnectCode::ServerUnavailable,
                shared.config.limits.write_timeout,
            ))
            .await;
            return;
        };
        if let Err(reason) = Box::pin(session(shared.clone(), opened)).await {
            debug!(%reason, "connection ended");
        }
        drop(permit);
    }
    .instrument(span)
    .await
}

async fn handshake(shared: &Shared, tcp: TcpStream) -> Option<(Tls, Identity, Vec<u8>)> {
    let accept = TlsStream::accept(tcp, shared.tls_config());
    let tls = match timeout(shared.config.tls.handshake_timeout, accept).await {
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
    /// The MQTT core closed the connection (it already forgot it and published the will).
    ByCore(fleet_mqtt::CloseReason),
}

/// Most bytes taken from the core per write.
const WRITE_BATCH_BYTES: usize = 256 << 10;

/// Writes `packets` with `deadline` as the longest a write may make no progress.
async fn write_packets(
    wr: &mut WriteHalf<Tls>,
    packets: &[Packet],
    deadline: Duration,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for p in packets {
        encode(p, &mut out).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let mut at = 0;
    while at < out.len() {
        let rest = out.get(at..).unwrap_or_default();
        match timeout(deadline, wr.write(rest)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => at += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read within the write timeout",
                ))
            }
        }
    }
    match timeout(deadline, wr.flush()).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn refuse(wr: &mut WriteHalf<Tls>, code: ConnectCode, deadline: Duration) {
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
    });
    let _ = write_packets(wr, &[ack], deadline).await;
    let _ = wr.shutdown().await;
}

/// The session key of a connection: the certificate's role and id, and for a service the
/// instance part of its client id.
fn session_key(identity: &Identity, client_id: &str) -> SessionKey {
    let role = match identity.role {
        fleet_certs::Role::Device => Role::Device,
        fleet_certs::Role::Service => Role::Service,
        fleet_certs::Role::Gateway => Role::Gateway,
    };
    let instance = client_id
        .strip_prefix(identity.id.as_str())
        .and_then(|r| r.strip_prefix(':'))
        .map(str::to_owned);
    SessionKey {
        role,
        id: identity.id.clone(),
        instance,
    }
}

/// A connection through TLS, CONNECT read and checked by the edge: ready for the core.
struct Opened {
    rd: ReadHalf<Tls>,
    wr: WriteHalf<Tls>,
    inbuf: BytesMut,
    identity: Identity,
    cert: Vec<u8>,
    client_id: String,
    connect: fleet_mqtt::Connect,
}

/// Reads and checks CONNECT: the pre-authentication part of a connection. `None`: refused
/// (answered and closed here).
async fn opening(
    shared: &Shared,
    tls: Tls,
    identity: Identity,
    cert: Vec<u8>,
    trusted_as_of: u64,
) -> Option<Box<Opened>> {
    match read_connect(shared, tls, identity, cert, trusted_as_of).await {
        Ok(o) => Some(o),
        Err(reason) => {
            debug!(%reason, "connection refused");
            None
        }
    }
}

async fn read_connect(
    shared: &Shared,
    tls: Tls,
    identity: Identity,
    cert: Vec<u8>,
    trusted_as_of: u64,
) -> Result<Box<Opened>, String> {
    let decoder = Decoder::new(shared.config.limits.max_packet_size);
    let write_timeout = shared.config.limits.write_timeout;
    let (mut rd, mut wr) = tokio::io::split(tls);
    // Small: it grows for large packets, and an idle connection keeps what it has.
    let mut inbuf = BytesMut::with_capacity(256);

    // CONNECT first, within the connect timeout.
    let first = timeout(shared.config.limits.connect_timeout, async {
        loop {
            // The first packet must be CONNECT: refuse anything else at its first byte.
            if inbuf.first().is_some_and(|b| *b != 0x10) {
                return Err(None);
            }
            if let Some(p) = decoder.decode(&mut inbuf).map_err(Some)? {
                return Ok(p);
            }
            match rd.read_buf(&mut inbuf).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    })
    .await;
    let connect = match first {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Err(Some(DecodeError::UnsupportedLevel(level)))) => {
            Metrics::inc(&shared.metrics.connects_refused);
            info!(level, "unsupported protocol level; CONNACK 0x01");
            refuse(
                &mut wr,
                ConnectCode::UnacceptableProtocolVersion,
                write_timeout,
            )
            .await;
            return Err("unsupported protocol level".into());
        }
        Ok(Err(Some(e))) => {
            Metrics::inc(&shared.metrics.protocol_errors);
            if let Some(suppressed) = shared.bad_input_log.allow() {
                warn!(error = %e, suppressed, "malformed CONNECT");
            }
            return Err(e.to_string());
        }
        Ok(Ok(_)) | Ok(Err(None)) => {
            Metrics::inc(&shared.metrics.protocol_errors);
            info!("no CONNECT as the first packet");
            return Err("first packet not CONNECT".into());
        }
        Err(_) => {
            Metrics::inc(&shared.metrics.connects_refused);
            info!("no CONNECT within the connect timeout");
            return Err("connect timeout".into());
        }
    };

    // The client id is the certificate's id: an empty one is assigned, another is refused.
    // A service may run several connections, each as `{id}:{instance}`.
    let Some(client_id) = session_client_id(&identity, &connect.client_id) else {
        Metrics::inc(&shared.metrics.connects_refused);
        warn!(client_id = %connect.client_id, "client id differs from the certificate's id; refused");
        refuse(&mut wr, ConnectCode::IdentifierRejected, write_timeout).await;
        return Err("client id mismatch".into());
    };
    tracing::Span::current().record("client_id", client_id.as_str());

    // The handshake may have finished before a revocation was loaded: the certificate is
    // checked again against the CRL in force now.
    if let Err(e) = shared.verify_now(&cert, trusted_as_of) {
        Metrics::inc(&shared.metrics.connects_refused);
        warn!(error = %e, "certificate no longer valid at CONNECT; refused");
        refuse(&mut wr, ConnectCode::NotAuthorized, write_timeout).await;
        return Err("certificate no longer valid".into());
    }
    // Boxed: the connection's task keeps a pointer, not the whole of it, for its life.
    Ok(Box::new(Opened {
        rd,
        wr,
        inbuf,
        identity,
        cert,
        client_id,
        connect,
    }))
}

async fn session(shared: Arc<Shared>, opened: Box<Opened>) -> Result<(), String> {
    let Opened {
        mut rd,
        mut wr,
        mut inbuf,
        identity,
        cert,
        client_id,
        connect,
    } = *opened;
    let decoder = Decoder::new(shared.config.limits.max_packet_size);
    let write_timeout = shared.config.limits.write_timeout;

    // One connection per identity: the previous one is asked to close.
    let mut registration = shared.sessions.register(&client_id, cert);
    let port = shared.router.attach();
    let key = session_key(&identity, &client_id);
    let clean = connect.clean_session;
    let keep_alive = connect.keep_alive;
    let mut pump = Pump {
        shared: shared.clone(),
        identity,
        port,
        out: Vec::new(),
        write_timeout,
    };
    // The engine gets the CONNECT as sent (an empty client id with clean session 0 is its to
    // refuse); the session is `key`, from the certificate.
    shared.router.connect(&pump.port, key, connect);
    shared
        .router
        .transmit(&pump.port, WRITE_BATCH_BYTES, &mut pump.out);
    let accepted = match pump.out.first() {
        Some(Packet::ConnAck(ack)) => (ack.code == ConnectCode::Accepted).then_some(*ack),
        _ => None,
    };
    if let Err(e) = Box::pin(pump.flush(&mut wr, &mut registration.close)).await {
        shared
            .router
            .disconnected(&pump.port, Disconnected::Abnormal);
        return Err(e.to_string());
    }
    let Some(ack) = accepted else {
        Metrics::inc(&shared.metrics.connects_refused);
        info!("CONNECT refused by the MQTT core");
        let _ = wr.shutdown().await;
        return Err("refused".into());
    };
    shared.session_event(
        &pump.identity,
        SessionEvent::Connected {
            id: pump.identity.id.clone(),
            session_present: ack.session_present,
        },
    );
    Metrics::inc(&shared.metrics.sessions_opened);
    info!(clean_session = clean, keep_alive, "session open");

    let end = pump
        .run(
            &mut rd,
            &mut wr,
            &mut inbuf,
            &decoder,
            &mut registration,
            keep_alive,
        )
        .await;

    match &end {
        End::Graceful => info!("client disconnected"),
        End::Abnormal(why) => info!(reason = %why, "connection lost"),
        End::ByCore(why) => {
            if !matches!(why, fleet_mqtt::CloseReason::Takeover) {
                Metrics::inc(&shared.metrics.clients_closed_over_limits);
            }
            info!(reason = ?why, "closed by the MQTT core")
        }
    }
    let how = match end {
        End::Graceful => Some(Disconnected::Graceful),
        End::Abnormal(_) => Some(Disconnected::Abnormal),
        End::ByCore(_) => None,
    };
    if let Some(how) = how {
        shared.router.disconnected(&pump.port, how);
    }
    shared.session_event(
        &pump.identity,
        SessionEvent::Disconnected {
            id: pump.identity.id.clone(),
        },
    );
    let _ = timeout(write_timeout, wr.shutdown()).await;
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

/// What a packet from the client leads to.
enum Step {
    Continue,
    Stop(End),
}

struct Pump {
    shared: Arc<Shared>,
    identity: Identity,
    port: Port,
    /// Packets to write to the client at the next flush.
    out: Vec<Packet>,
    write_timeout: Duration,
}

impl Pump {
    async fn run(
        &mut self,
        rd: &mut ReadHalf<Tls>,
        wr: &mut WriteHalf<Tls>,
        inbuf: &mut BytesMut,
        decoder: &Decoder,
        registration: &mut super::sessions::Registration,
        keep_alive: u16,
    ) -> End {
        let super::sessions::Registration { close, direct, .. } = registration;
        // MQTT 3.1.1: the server closes a connection silent for 1.5 x keep-alive (0: never).
        let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let far = Duration::from_secs(365 * 24 * 3600);
        let mut deadline = Instant::now() + idle.unwrap_or(far);
        let wake = self.port.wake.clone();
        loop {
            tokio::select! {
                biased;
                changed = close.changed() => {
                    let reason = if changed.is_ok() { *close.borrow() } else { Some(CloseReason::Shutdown) };
                    if let Some(reason) = reason {
                        return End::Abnormal(format!("closed by the gateway: {reason}"));
                    }
                }
                () = wake.notified() => {
                    if let Some(end) = Box::pin(self.send_pending(wr, close)).await {
                        return end;
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
                        match decoder.decode(inbuf) {
                            Ok(Some(packet)) => {
                                // Boxed while it runs: the loop's own state stays small.
                                if let Step::Stop(end) = Box::pin(self.on_packet(packet)).await {
                                    self.take();
                                    let _ = Box::pin(self.flush(wr, close)).await;
                                    return end;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                Metrics::inc(&self.shared.metrics.protocol_errors);
                                if let Some(suppressed) = self.shared.bad_input_log.allow() {
                                    warn!(error = %e, suppressed, "malformed packet; closing connection");
                                }
                                return End::Abnormal(e.to_string());
                            }
                        }
                    }
                    if let Some(end) = Box::pin(self.send_pending(wr, close)).await {
                        return end;
                    }
                }
                () = direct.ready() => {
                    // Bulk data from a service (firmware chunks), written as it is.
                    let n = direct.take(64, &mut self.out);
                    Metrics::add(&self.shared.metrics.publishes_out, n as u64);
                    if let Err(e) = Box::pin(self.flush(wr, close)).await {
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

    /// Writes what the core has for this client; `Some` when the connection ends (the core
    /// closed it: what it queued before, such as a refusal, still goes out; or a write failed).
    async fn send_pending(
        &mut self,
        wr: &mut WriteHalf<Tls>,
        close: &mut watch::Receiver<Option<CloseReason>>,
    ) -> Option<End> {
        let closed = self.port.closed();
        self.take();
        let written = self.flush(wr, close).await;
        match (closed, written) {
            (Some(why), _) => Some(End::ByCore(why)),
            (None, Err(e)) => Some(End::Abnormal(format!("write error: {e}"))),
            (None, Ok(())) => None,
        }
    }

    /// Takes what the core has for this client (one batch).
    fn take(&mut self) {
        let before = self.out.len();
        self.shared
            .router
            .transmit(&self.port, WRITE_BATCH_BYTES, &mut self.out);
        let published = self
            .out
            .get(before..)
            .unwrap_or_default()
            .iter()
            .filter(|p| matches!(p, Packet::Publish(_)))
            .count();
        Metrics::add(&self.shared.metrics.publishes_out, published as u64);
        // What did not fit the batch is announced again by the core (it asks for a transmit
        // whenever something is left to send), so there is no need to wake ourselves.
    }

    /// Writes what is queued. A client that does not read within the write timeout is
    /// counted: it is closed like one over a cap. A close signal (the gateway's, or the core's
    /// takeover) abandons the write at once, so a client that does not read cannot delay it.
    async fn flush(
        &mut self,
        wr: &mut WriteHalf<Tls>,
        close: &mut watch::Receiver<Option<CloseReason>>,
    ) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let more = std::sync::atomic::AtomicBool::new(false);
        let closing = async {
            loop {
                tokio::select! {
                    changed = close.changed() => {
                        if changed.is_err() || close.borrow().is_some() {
                            return;
                        }
                    }
                    () = self.port.wake.notified() => {
                        if self.port.closed().is_some() {
                            return;
                        }
                        // Only more to send: it is taken after this write.
                        more.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        };
        let r = tokio::select! {
            r = write_packets(wr, &out, self.write_timeout) => r,
            () = closing => Err(std::io::Error::other("closed while writing")),
        };
        if more.load(std::sync::atomic::Ordering::Relaxed) {
            self.port.wake.notify_one();
        }
        // `out` is dropped, not kept for the next write: an idle connection holds no batch.
        drop(out);
        if let Err(e) = &r {
            if e.kind() == std::io::ErrorKind::TimedOut {
                Metrics::inc(&self.shared.metrics.clients_closed_over_limits);
                warn!("the client did not read within the write timeout; closing");
            }
        }
        r
    }

    fn violation(&self, what: String) -> Step {
        Metrics::inc(&self.shared.metrics.protocol_errors);
        if let Some(suppressed) = self.shared.bad_input_log.allow() {
            warn!(reason = %what, suppressed, "protocol violation; closing connection");
        }
        Step::Stop(End::Abnormal(what))
    }

    async fn on_packet(&mut self, packet: Packet) -> Step {
        match packet {
            Packet::Publish(mut publish) => {
                Metrics::inc(&self.shared.metrics.publishes_in);
                // The decoder's payload shares the read buffer; a copy keeps a small message
                // queued for an offline session from holding a whole read buffer alive.
                publish.payload = Bytes::copy_from_slice(&publish.payload);
                if self.identity.role == fleet_certs::Role::Device {
                    if let Some(step) = self.store_status(&publish).await {
                        return step;
                    }
                }
                self.shared
                    .router
                    .packet(&self.port, Packet::Publish(publish));
                Step::Continue
            }
            Packet::Subscribe(subscribe) => {
                let policy = self.shared.policy();
                let granted: Vec<String> = subscribe
                    .filters
                    .iter()
                    .filter(|(f, _)| policy.check_subscribe(&self.identity, f) == Decision::Allow)
                    .map(|(f, _)| f.clone())
                    .collect();
                self.shared
                    .router
                    .packet(&self.port, Packet::Subscribe(subscribe));
                // The core holds the subscription now: what a service publishes next reaches it.
                if !granted.is_empty() {
                    self.shared.session_event(
                        &self.identity,
                        SessionEvent::Subscribed {
                            id: self.identity.id.clone(),
                            filters: granted,
                        },
                    );
                }
                Step::Continue
            }
            Packet::Disconnect => Step::Stop(End::Graceful),
            Packet::Connect(_) => self.violation("second CONNECT [MQTT-3.1.0-2]".into()),
            p @ (Packet::Unsubscribe(_)
            | Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::PingReq) => {
                self.shared.router.packet(&self.port, p);
                Step::Continue
            }
            other => self.violation(format!("unexpected packet from a client: {}", other.name())),
        }
    }

    /// A device's status report goes to the status owner before the core may acknowledge it.
    /// `None`: stored, hand it to the core (which routes and acknowledges it); `Some(step)`:
    /// handled here (malformed or duplicate: acknowledged and dropped; store failure: the
    /// connection closes and the device sends it again later).
    async fn store_status(&mut self, publish: &Publish) -> Option<Step> {
        let Ok(Topic::Device {
            id,
            kind: DeviceTopic::Status,
        }) = topics::parse(&publish.topic)
        else {
            return None;
        };
        // Only a device's own status reaches the owner; the core denies the rest.
        if id.as_str() != self.identity.id {
            return None;
        }
        let payload: Bytes = publish.payload.clone();
        match self.shared.status.offer(id.as_str(), payload).await {
            StatusVerdict::Stored => None,
            StatusVerdict::Dropped => {
                // Answered here so the device does not send it forever. A QoS 2 id answered
                // this way is released by PUBREL, which the core answers for unknown ids.
                match (publish.qos, publish.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => self.out.push(Packet::PubAck(id)),
                    (QoS::ExactlyOnce, Some(id)) => self.out.push(Packet::PubRec(id)),
                    _ => {}
                }
                Some(Step::Continue)
            }
            StatusVerdict::Failed => Some(Step::Stop(End::Abnormal(
                "status report could not be stored".into(),
            ))),
        }
    }
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
