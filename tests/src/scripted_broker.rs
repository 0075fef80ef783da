//! A cloud broker that refuses subscriptions on cue: MQTT 3.1.1 over TLS on 127.0.0.1, port 0,
//! answering CONNECT, SUBSCRIBE, PUBLISH (QoS 0 and 1) and PINGREQ, and recording what it saw.
//! The first `refuse` SUBSCRIBE packets it receives (counted over all connections) are answered
//! with a failure (0x80) for every filter; later ones are granted at QoS 1.
//!
//! A cluster refuses subscriptions this way while it elects leaders (NATS: "Unable to add
//! JetStream consumer"), but only by chance; this broker does it on every run, so that a test
//! can check what a client does next. It delivers only what the test hands it
//! ([`ScriptedBroker::publish`]), to every connection with a granted subscription.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::mqtt::{packet, publish_packet, split_packet};

/// A SUBSCRIBE as the broker saw it.
#[derive(Debug, Clone)]
pub struct Subscribe {
    /// Number of the connection it came on (1 for the first).
    pub connection: u64,
    /// When it arrived.
    pub at: Instant,
    /// Its filters.
    pub filters: Vec<String>,
    /// Whether it was granted.
    pub granted: bool,
}

#[derive(Default)]
struct Seen {
    connections: u64,
    subscribes: Vec<Subscribe>,
    published: Vec<(String, Vec<u8>)>,
}

/// The running broker; it stops when dropped.
pub struct ScriptedBroker {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    down: broadcast::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedBroker {
    /// Starts it with the server certificate `cert`/`key` (PEM); it refuses the first
    /// `refuse` SUBSCRIBE packets.
    pub async fn start(cert: &Path, key: &Path, refuse: usize) -> Self {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap_or_else(|e| panic!("{}: {e}", cert.display()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{}: {e}", cert.display()));
        let key =
            PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .unwrap_or_else(|e| panic!("server config: {e}"));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (down, _) = broadcast::channel(64);
        let (s, d) = (seen.clone(), down.clone());
        let task = tokio::spawn(async move {
            let refused = Arc::new(AtomicUsize::new(0));
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, down, refused) =
                    (acceptor.clone(), s.clone(), d.subscribe(), refused.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, seen, down, refused, refuse).await;
                    }
                });
            }
        });
        ScriptedBroker {
            addr,
            seen,
            down,
            task,
        }
    }

    /// Its address as a client names it (the certificate names `localhost`).
    pub fn address(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// Every SUBSCRIBE so far, in arrival order.
    pub fn subscribes(&self) -> Vec<Subscribe> {
        lock(&self.seen).subscribes.clone()
    }

    /// Connections accepted so far (CONNECT answered).
    pub fn connections(&self) -> u64 {
        lock(&self.seen).connections
    }

    /// Every PUBLISH received so far: (topic, payload).
    pub fn published(&self) -> Vec<(String, Vec<u8>)> {
        lock(&self.seen).published.clone()
    }

    /// Sends a QoS 0 PUBLISH to every connection that has a granted subscription (whatever
    /// its filter: the test knows what its client subscribed to).
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        let _ = self
            .down
            .send(publish_packet(topic.as_bytes(), payload, 0, 0));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A UTF-8 string with its two-byte length, from the front of `b`.
fn take_string(b: &mut &[u8]) -> Option<String> {
    let len = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    let s = b.get(2..2 + len)?;
    let out = String::from_utf8_lossy(s).into_owned();
    *b = b.get(2 + len..)?;
    Some(out)
}

async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    seen: Arc<Mutex<Seen>>,
    mut down: broadcast::Receiver<Vec<u8>>,
    refused: Arc<AtomicUsize>,
    refuse: usize,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut connection = 0;
    let mut granted = false;
    loop {
        while let Ok(Some((first, body))) = split_packet(&mut buf) {
            let answer = match first >> 4 {
                1 => {
                    let mut s = lock(&seen);
                    s.connections += 1;
                    connection = s.connections;
                    Some(packet(0x20, &[0, 0]))
                }
                8 => {
                    let (Some(id), Some(mut rest)) = (body.get(..2), body.get(2..)) else {
                        return;
                    };
                    let mut filters = Vec::new();
                    while !rest.is_empty() {
                        let Some(f) = take_string(&mut rest) else {
                            return;
                        };
                        filters.push(f);
                        rest = rest.get(1..).unwrap_or_default();
                    }
                    let refuse_this = refused.fetch_add(1, Ordering::Relaxed) < refuse;
                    granted |= !refuse_this;
                    let code = if refuse_this { 0x80 } else { 0x01 };
                    let mut ack = id.to_vec();
                    ack.extend(std::iter::repeat_n(code, filters.len()));
                    lock(&seen).subscribes.push(Subscribe {
                        connection,
                        at: Instant::now(),
                        filters,
                        granted: !refuse_this,
                    });
                    Some(packet(0x90, &ack))
                }
                3 => {
                    let qos = (first >> 1) & 3;
                    let mut rest = body.as_slice();
                    let Some(topic) = take_string(&mut rest) else {
                        return;
                    };
                    let ack = if qos > 0 {
                        let id = rest.get(..2).map(<[u8]>::to_vec);
                        rest = rest.get(2..).unwrap_or_default();
                        id.map(|id| packet(0x40, &id))
                    } else {
                        None
                    };
                    lock(&seen).published.push((topic, rest.to_vec()));
                    ack
                }
                12 => Some(vec![0xd0, 0x00]),
                14 => return,
                _ => None,
            };
            if let Some(a) = answer {
                if tls.write_all(&a).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            n = tls.read(&mut chunk) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            },
            p = down.recv() => match p {
                Ok(p) if granted => {
                    if tls.write_all(&p).await.is_err() {
                        return;
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
