//! A deliberately small MQTT 3.1.1 client over TLS for load generation and hostile-input tests:
//! raw packet builders, and a client that pipelines QoS 1 publishes. It trusts nothing it does
//! not check, and is not meant for devices (that is `device-client`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Errors of this client.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A rustls client configuration trusting `ca` and presenting `cert_pem`/`key_pem`.
pub fn client_config(
    ca: &Path,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let chain =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Appends an MQTT remaining length.
pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// A packet: first byte, remaining length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

fn string(s: &[u8]) -> Vec<u8> {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// CONNECT, MQTT 3.1.1, clean session.
pub fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(4);
    body.push(0x02);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&string(client_id.as_bytes()));
    packet(0x10, &body)
}

/// PUBLISH with the given QoS and packet id (ignored at QoS 0).
pub fn publish_packet(topic: &[u8], payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let mut body = string(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// SUBSCRIBE to `(filter, qos)` pairs.
pub fn subscribe_packet(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (f, q) in filters {
        body.extend_from_slice(&string(f.as_bytes()));
        body.push(*q);
    }
    packet(0x82, &body)
}

/// Splits the first whole packet off `buf`: (first byte, body), or `None` if incomplete.
pub fn split_packet(buf: &mut Vec<u8>) -> Result<Option<(u8, Vec<u8>)>, Error> {
    let (mut len, mut shift, mut at) = (0usize, 0, 1);
    loop {
        let Some(b) = buf.get(at) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("bad remaining length".into());
        }
    }
    if buf.len() < at + len {
        return Ok(None);
    }
    let first = buf[0];
    let body = buf[at..at + len].to_vec();
    buf.drain(..at + len);
    Ok(Some((first, body)))
}

/// A payload of `size` bytes (at least 8) starting with the nanoseconds since `base`.
pub fn stamp(base: Instant, size: usize) -> Vec<u8> {
    let nanos = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut p = nanos.to_be_bytes().to_vec();
    p.resize(size.max(8), 0x5a);
    p
}

/// A connected client.
pub struct Client {
    stream: TlsStream<TcpStream>,
    inbuf: Vec<u8>,
}

impl Client {
    /// TLS to `addr` (server name `localhost`), CONNECT as `client_id`, CONNACK accepted.
    pub async fn connect(
        addr: &str,
        config: Arc<rustls::ClientConfig>,
        client_id: &str,
        keep_alive: u16,
    ) -> Result<Client, Error> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let mut c = Client {
            stream,
            inbuf: Vec::with_capacity(4096),
        };
        c.stream
            .write_all(&connect_packet(client_id, keep_alive))
            .await?;
        let (first, body) = c.next_packet().await?;
        if first != 0x20 || body.get(1) != Some(&0) {
            return Err(format!("{client_id}: CONNACK refused: {first:#x} {body:?}").into());
        }
        Ok(c)
    }

    /// Reads the next packet.
    pub async fn next_packet(&mut self) -> Result<(u8, Vec<u8>), Error> {
        loop {
            if let Some(p) = split_packet(&mut self.inbuf)? {
                return Ok(p);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.inbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends DISCONNECT and closes.
    pub async fn disconnect(mut self) {
        let _ = self.stream.write_all(&[0xe0, 0x00]).await;
        let _ = self.stream.shutdown().await;
    }

    /// Subscribes to one filter and checks the SUBACK grants it.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<(), Error> {
        self.stream
            .write_all(&subscribe_packet(1, &[(filter, qos)]))
            .await?;
        let (first, body) = self.next_packet().await?;
        if first != 0x90 || body.get(2).is_none_or(|c| *c == 0x80) {
            return Err(format!("subscription to {filter} refused").into());
        }
        Ok(())
    }

    /// Receives publishes forever, acknowledging QoS 1 ones and counting them all. With
    /// `latency`, payloads are read as [`stamp`]ed and each message's latency (nanoseconds) is
    /// recorded.
    pub async fn receive_and_ack(
        &mut self,
        count: Arc<AtomicU64>,
        latency: Option<(Instant, Arc<std::sync::Mutex<Vec<u64>>>)>,
    ) -> Result<(), Error> {
        loop {
            let (first, body) = self.next_packet().await?;
            if first >> 4 != 3 {
                continue;
            }
            count.fetch_add(1, Ordering::Relaxed);
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let payload_at = 2 + topic_len + if qos > 0 { 2 } else { 0 };
            if let Some((base, sink)) = &latency {
                if let Some(sent) = body.get(payload_at..payload_at + 8) {
                    let sent = u64::from_be_bytes(sent.try_into().unwrap_or([0; 8]));
                    let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    if let Ok(mut v) = sink.lock() {
                        v.push(now.saturating_sub(sent));
                    }
                }
            }
            if qos == 1 {
                let pkid = &body[2 + topic_len..4 + topic_len];
                // Several acks may be pending in the buffer; write each as it comes.
                self.stream
                    .write_all(&[0x40, 0x02, pkid[0], pkid[1]])
                    .await?;
            }
        }
    }

    /// Publishes QoS 1 to `topic` at `rate` messages per second (each payload [`stamp`]ed with
    /// its send time) with up to `window` unacknowledged, until `stop`; counts acknowledged
    /// messages in `acked`.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_qos1_paced(
        &mut self,
        topic: &str,
        size: usize,
        rate: f64,
        window: u16,
        stop: Instant,
        base: Instant,
        acked: &AtomicU64,
    ) -> Result<(), Error> {
        let start = Instant::now();
        let (mut sent, mut in_flight, mut pkid) = (0u64, 0u16, 0u16);
        loop {
            let now = Instant::now();
            let sending = now < stop;
            if !sending && in_flight == 0 {
                return Ok(());
            }
            let due = if sending {
                ((now - start).as_secs_f64() * rate) as u64
            } else {
                sent
            };
            let mut batch = Vec::new();
            while sent < due && in_flight < window {
                pkid = pkid % 60_000 + 1;
                batch.extend_from_slice(&publish_packet(
                    topic.as_bytes(),
                    &stamp(base, size),
                    1,
                    pkid,
                ));
                sent += 1;
                in_flight += 1;
            }
            if !batch.is_empty() {
                self.stream.write_all(&batch).await?;
            }
            tokio::select! {
                p = self.next_packet() => {
                    if p?.0 == 0x40 {
                        in_flight -= 1;
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ = tokio::time::sleep(std::time::Duration::from_millis(1)) => {}
            }
        }
    }

    /// Publishes QoS 1 to `topic` with up to `window` messages unacknowledged, until `stop`;
    /// counts acknowledged messages in `acked`.
    pub async fn publish_qos1_until(
        &mut self,
        topic: &str,
        payload: &[u8],
        window: u16,
        stop: Instant,
        acked: &AtomicU64,
    ) -> Result<(), Error> {
        let mut in_flight = 0u16;
        let mut pkid = 0u16;
        loop {
            let sending = Instant::now() < stop;
            if !sending && in_flight == 0 {
                return Ok(());
            }
            if sending && in_flight < window {
                let mut batch = Vec::new();
                while in_flight < window {
                    pkid = pkid % 60_000 + 1;
                    batch.extend_from_slice(&publish_packet(topic.as_bytes(), payload, 1, pkid));
                    in_flight += 1;
                }
                self.stream.write_all(&batch).await?;
            }
            let (first, _) = self.next_packet().await?;
            if first == 0x40 {
                in_flight -= 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Appends a QoS 1 PUBLISH of `size` payload bytes (at least 8) whose payload starts with
/// `stamp` (big-endian, as [`stamp`] writes it), without building the payload separately.
pub fn push_publish_qos1(out: &mut Vec<u8>, topic: &[u8], pkid: u16, stamp: u64, size: usize) {
    let size = size.max(8);
    let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
    out.push(0x32);
    remaining_length(2 + usize::from(topic_len) + 2 + size, out);
    out.extend_from_slice(&topic_len.to_be_bytes());
    out.extend_from_slice(&topic[..usize::from(topic_len)]);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(&stamp.to_be_bytes());
    out.resize(out.len() + size - 8, 0x5a);
}

/// The whole packet starting at `buf[at..]`: (first byte, body range, where the next starts),
/// or `None` if it is not all there yet.
fn packet_at(buf: &[u8], at: usize) -> Result<Option<(u8, std::ops::Range<usize>, usize)>, Error> {
    let Some(&first) = buf.get(at) else {
        return Ok(None);
    };
    let (mut len, mut shift, mut pos) = (0usize, 0, at + 1);
    loop {
        let Some(b) = buf.get(pos) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("bad remaining length".into());
        }
    }
    if buf.len() < pos + len {
        return Ok(None);
    }
    Ok(Some((first, pos..pos + len, pos + len)))
}

/// What a receiving client has seen so far, shared with the task that receives.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// PUBLISH packets received.
    pub count: AtomicU64,
    /// Their payload bytes.
    pub payload_bytes: AtomicU64,
    /// When the last one arrived: nanoseconds since the receiver's `base`, 0 before the first.
    pub last_nanos: AtomicU64,
}

/// How [`Client::publish_qos1`] publishes.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    /// Topics used in turn: message `i` goes to `topics[i % topics.len()]`.
    pub topics: Vec<String>,
    /// Payload bytes per message (at least 8); each payload starts with its send time (see
    /// [`stamp`]). With a rate, a message the window holds back is sent, and stamped, when
    /// there is room: the publisher's acknowledged rate then falls short of its rate.
    pub size: usize,
    /// Most messages unacknowledged at a time (at most 60,000).
    pub window: u16,
    /// Messages per second, or `None`: as fast as the window allows.
    pub rate: Option<f64>,
    /// With a rate, when this client's first message is due, after the call (spreads many
    /// clients' sends over the period).
    pub offset: std::time::Duration,
    /// Stop after this many messages (`None`: no limit).
    pub limit: Option<u64>,
    /// Stop sending at this instant.
    pub stop: Instant,
    /// Wait for outstanding acknowledgements until this instant, then give up on them.
    pub drain_until: Instant,
    /// Send times are stamped as nanoseconds since this instant.
    pub base: Instant,
}

/// What [`Client::publish_qos1`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Messages written.
    pub sent: u64,
    /// Of those, acknowledged (PUBACK).
    pub acked: u64,
}

impl Client {
    /// Reads whatever the server has sent next into the input buffer.
    async fn read_more(&mut self, chunk: &mut [u8]) -> Result<(), Error> {
        let n = self.stream.read(chunk).await?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.inbuf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Receives publishes until the connection fails, counting them in `seen` and answering
    /// each QoS 1 one with a PUBACK; the acknowledgements for everything one read brought are
    /// written together. With `latencies`, each payload is read as a [`stamp`] relative to
    /// `base` and its latency (nanoseconds) recorded.
    pub async fn receive_and_ack_batched(
        &mut self,
        base: Instant,
        seen: Arc<Deliveries>,
        latencies: Option<Arc<std::sync::Mutex<Vec<u64>>>>,
    ) -> Result<(), Error> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut acks = Vec::new();
        let mut stamps = Vec::new();
        loop {
            let mut at = 0;
            while let Some((first, body, next)) = packet_at(&self.inbuf, at)? {
                at = next;
                if first >> 4 != 3 {
                    continue;
                }
                let body = &self.inbuf[body];
                let qos = (first >> 1) & 3;
                let topic_len = match body.get(..2) {
                    Some(l) => usize::from(u16::from_be_bytes([l[0], l[1]])),
                    None => return Err("PUBLISH shorter than its topic length".into()),
                };
                let payload_at = 2 + topic_len + if qos > 0 { 2 } else { 0 };
                let payload = body
                    .get(payload_at..)
                    .ok_or("PUBLISH shorter than its header")?;
                if qos > 0 {
                    acks.extend_from_slice(&[0x40, 0x02]);
                    acks.extend_from_slice(&body[2 + topic_len..payload_at]);
                }
                if latencies.is_some() {
                    if let Some(s) = payload.get(..8) {
                        stamps.push(u64::from_be_bytes(s.try_into().unwrap_or([0; 8])));
                    }
                }
                seen.count.fetch_add(1, Ordering::Relaxed);
                seen.payload_bytes
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
            }
            self.inbuf.drain(..at);
            if at > 0 {
                let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                seen.last_nanos.store(now.max(1), Ordering::Relaxed);
                if let (Some(sink), false) = (&latencies, stamps.is_empty()) {
                    if let Ok(mut v) = sink.lock() {
                        v.extend(stamps.iter().map(|s| now.saturating_sub(*s)));
                    }
                    stamps.clear();
                }
            }
            if !acks.is_empty() {
                self.stream.write_all(&acks).await?;
                acks.clear();
            }
            self.read_more(&mut chunk).await?;
        }
    }

    /// Publishes QoS 1 as `plan` says, counting acknowledgements in `acked` as they arrive;
    /// returns once everything sent is acknowledged or `plan.drain_until` has passed.
    pub async fn publish_qos1(
        &mut self,
        plan: &PublishPlan,
        acked: &AtomicU64,
    ) -> Result<Published, Error> {
        use std::time::Duration;
        use tokio::time::Instant as TokioInstant;
        if plan.topics.is_empty() {
            return Err("no topic to publish to".into());
        }
        let window = u64::from(plan.window.clamp(1, 60_000));
        // With a rate, message k is due at `first + k / rate`.
        let first = Instant::now() + plan.offset;
        let due_at = |k: u64, r: f64| first + Duration::from_secs_f64(k as f64 / r);
        let nanos = |t: Instant| {
            u64::try_from(t.saturating_duration_since(plan.base).as_nanos()).unwrap_or(u64::MAX)
        };
        let mut chunk = vec![0u8; 16 * 1024];
        let mut batch = Vec::new();
        let mut done = Published::default();
        let mut pkid = 0u16;
        loop {
            let now = Instant::now();
            let sending = plan.limit.is_none_or(|l| done.sent < l) && now < plan.stop;
            let room = |d: &Published| d.sent - d.acked < window;
            // Stamped with the send time. (Not with when each was due: the timer that wakes this
            // task is coarser than the latencies measured.)
            let stamp = nanos(now);
            while sending && room(&done) {
                let not_due = plan.rate.is_some_and(|r| due_at(done.sent, r) > now);
                if not_due || plan.limit.is_some_and(|l| done.sent >= l) {
                    break;
                }
                pkid = pkid % 60_000 + 1;
                let topic = &plan.topics[(done.sent % plan.topics.len() as u64) as usize];
                push_publish_qos1(&mut batch, topic.as_bytes(), pkid, stamp, plan.size);
                done.sent += 1;
            }
            if !batch.is_empty() {
                self.stream.write_all(&batch).await?;
                batch.clear();
            }
            if !sending && done.acked == done.sent {
                return Ok(done);
            }
            // Wait for acknowledgements; while sending at a rate with room in the window, no
            // longer than until the next message is due.
            let wake = match plan.rate {
                _ if !sending => plan.drain_until,
                Some(r) if room(&done) => due_at(done.sent, r).min(plan.stop),
                _ => plan.stop,
            };
            match tokio::time::timeout_at(TokioInstant::from_std(wake), self.read_more(&mut chunk))
                .await
            {
                Ok(read) => read?,
                Err(_) if !sending => return Ok(done),
                Err(_) => {}
            }
            let mut at = 0;
            while let Some((first, _, next)) = packet_at(&self.inbuf, at)? {
                at = next;
                if first == 0x40 && done.acked < done.sent {
                    done.acked += 1;
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.inbuf.drain(..at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_publishes_parse_back_one_after_another() {
        let mut buf = Vec::new();
        push_publish_qos1(&mut buf, b"devices/d1/bench", 7, 0x0102_0304_0506_0708, 300);
        push_publish_qos1(&mut buf, b"t", 8, 9, 3);
        let (first, body, next) = packet_at(&buf, 0)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("first packet incomplete"));
        assert_eq!(first, 0x32);
        let body = &buf[body];
        assert_eq!(&body[..2], &[0, 16]);
        assert_eq!(&body[2..18], b"devices/d1/bench");
        assert_eq!(&body[18..20], &[0, 7]);
        assert_eq!(&body[20..28], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(body.len() - 20, 300, "payload size");
        // The second: a payload shorter than a stamp is widened to one.
        let (_, body, end) = packet_at(&buf, next)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("second packet incomplete"));
        assert_eq!(end, buf.len());
        assert_eq!(&buf[body][5..], &9u64.to_be_bytes());
        // Cut short anywhere, it is incomplete, not misread.
        for cut in next..buf.len() {
            assert!(
                matches!(packet_at(&buf[..cut], next), Ok(None)),
                "cut {cut}"
            );
        }
    }
}
