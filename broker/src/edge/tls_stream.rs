//! The server side of one TLS connection, on rustls's unbuffered connection so that the edge
//! owns every buffer: TLS bytes read and not yet processed, plaintext decrypted and not yet
//! read, and TLS bytes waiting to be written. Each is handed back as soon as it is empty, so an
//! idle connection holds none of them (rustls's buffered connection keeps a 4 KiB read buffer
//! per connection for its whole life, a quarter of what an idle connection costs the gateway).
//!
//! Buffers handed back go to a small per-thread reserve ([`SPARE_BUFFERS`] of at most
//! [`SPARE_MAX_BYTES`] each) that the next connection needing one takes from: a busy connection
//! gets and returns a buffer per read or write, and the reserve keeps that from costing an
//! allocation, zero-filling and fresh pages each time.
//!
//! [`TlsStream`] is an [`AsyncRead`] + [`AsyncWrite`]. Reads and writes may interleave but are
//! not meant to run concurrently from two tasks (the edge's connection loop does one at a
//! time). Every buffer is bounded: a read takes at most one TLS record beyond what is pending,
//! the handshake may hold at most [`MAX_HANDSHAKE_INPUT`], and a write encrypts at most
//! [`MAX_WRITE`] bytes of plaintext at a time.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket at a time: one whole TLS record (16 KiB of plaintext, the
/// header and the largest expansion TLS 1.2 and 1.3 allow).
const READ_SIZE: usize = 16 * 1024 + 5 + 256;

/// Most TLS bytes held while the handshake is incomplete (rustls itself refuses handshake
/// messages over 64 KiB).
pub(crate) const MAX_HANDSHAKE_INPUT: usize = 64 * 1024 + 2 * READ_SIZE;

/// Most plaintext bytes encrypted by one write.
pub(crate) const MAX_WRITE: usize = 64 * 1024;

/// Buffers each thread keeps in reserve.
const SPARE_BUFFERS: usize = 8;

/// Largest buffer kept in reserve (a write's worth of records).
const SPARE_MAX_BYTES: usize = MAX_WRITE + 4096;

thread_local! {
    /// Buffers handed back, each with every byte initialized (`len` is its size).
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A byte buffer whose storage is taken from the reserve when needed and handed back when
/// empty. `data[..len]` holds the bytes; every byte of `data` is initialized, so growing
/// within it costs no zero-filling.
#[derive(Default)]
struct Buf {
    data: Vec<u8>,
    len: usize,
}

impl Buf {
    fn filled(&self) -> &[u8] {
        self.data.get(..self.len).unwrap_or_default()
    }

    fn filled_mut(&mut self) -> &mut [u8] {
        self.data.get_mut(..self.len).unwrap_or_default()
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// At least `n` bytes of room after the filled part.
    fn room(&mut self, n: usize) -> &mut [u8] {
        let need = self.len + n;
        if self.data.is_empty() {
            self.data = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
        }
        if self.data.len() < need {
            self.data.resize(need, 0);
        }
        self.data.get_mut(self.len..).unwrap_or_default()
    }

    /// `n` bytes of the room were filled.
    fn commit(&mut self, n: usize) {
        self.len = (self.len + n).min(self.data.len());
    }

    fn extend(&mut self, bytes: &[u8]) {
        let room = self.room(bytes.len());
        if let Some(dst) = room.get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
            self.commit(bytes.len());
        }
    }

    /// Drops `n` bytes from the front.
    fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.data.copy_within(n..self.len, 0);
        self.len -= n;
    }

    /// Hands the storage back when nothing is in it.
    fn release_if_empty(&mut self) {
        if self.len > 0 || self.data.capacity() == 0 {
            return;
        }
        let data = std::mem::take(&mut self.data);
        if data.len() <= SPARE_MAX_BYTES {
            SPARE.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < SPARE_BUFFERS {
                    s.push(data);
                }
            });
        }
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.data.capacity()
    }
}

/// What to do once rustls can take application data.
enum Op<'a> {
    /// Nothing: only process what was received and queue what rustls has to send.
    Process,
    /// Encrypt these bytes.
    Write(&'a [u8]),
    /// Queue a close_notify alert.
    Close,
}

/// Where processing stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The handshake needs more bytes from the peer.
    Blocked,
    /// The handshake is complete; application data can flow (and `Op` was carried out).
    Traffic,
    /// The peer closed the TLS session.
    PeerClosed,
}

/// A server TLS session over a TCP stream, with its buffers handed back whenever empty.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes received, not yet processed.
    incoming: Buf,
    /// TLS bytes to write; `[..sent]` is written already.
    outgoing: Buf,
    sent: usize,
    /// Plaintext received; `[..taken]` is read already.
    plain: Buf,
    taken: usize,
    /// The peer closed (close_notify or end of stream).
    eof: bool,
    /// Our close_notify is queued.
    close_queued: bool,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The room an encoding asked for, when that is why it failed.
fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

/// The room an encryption asked for, when that is why it failed.
fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

/// Encodes into `out` with `f`, growing the room to what it asks for.
fn encode_into<E>(
    out: &mut Buf,
    first_guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> io::Result<()>
where
    E: std::fmt::Display,
{
    let mut need = first_guess;
    loop {
        let room = out.room(need);
        match f(room.get_mut(..need).unwrap_or_default()) {
            Ok(n) => {
                out.commit(n);
                return Ok(());
            }
            Err(e) => match required(&e) {
                Some(r) if r > need => need = r,
                _ => return Err(invalid(e)),
            },
        }
    }
}

impl TlsStream {
    /// Runs the server handshake on `tcp`. The caller bounds it in time.
    pub(crate) async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut s = TlsStream {
            tcp,
            conn,
            incoming: Buf::default(),
            outgoing: Buf::default(),
            sent: 0,
            plain: Buf::default(),
            taken: 0,
            eof: false,
            close_queued: false,
        };
        loop {
            let stop = match s.process(Op::Process) {
                Ok(stop) => stop,
                Err(e) => {
                    // The alert rustls queued for the failure goes out, if the peer takes it.
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(100),
                        poll_fn(|cx| s.poll_send(cx)),
                    )
                    .await;
                    return Err(e);
                }
            };
            poll_fn(|cx| s.poll_send(cx)).await?;
            match stop {
                Stop::Traffic => {
                    s.release_empty();
                    return Ok(s);
                }
                Stop::PeerClosed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    ))
                }
                Stop::Blocked => {
                    if s.incoming.len >= MAX_HANDSHAKE_INPUT {
                        return Err(invalid("TLS handshake input over its limit"));
                    }
                    let n = poll_fn(|cx| s.poll_fill(cx)).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed during the TLS handshake",
                        ));
                    }
                }
            }
        }
    }

    /// The client's certificate chain, end entity first (after the handshake).
    pub(crate) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Hands back every buffer that is empty.
    fn release_empty(&mut self) {
        self.incoming.release_if_empty();
        self.outgoing.release_if_empty();
        self.plain.release_if_empty();
    }

    /// Processes what was received (decrypted application data goes to `plain`, handshake and
    /// alert records to `outgoing`) until rustls needs more input or can take application
    /// data, then carries out `op`.
    fn process(&mut self, op: Op<'_>) -> io::Result<Stop> {
        let mut op = Some(op);
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(self.incoming.filled_mut());
            let mut stop = None;
            let result: io::Result<()> = match state {
                Err(e) => Err(invalid(e)),
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    let mut r = Ok(());
                    while let Some(record) = records.next_record() {
                        match record {
                            Ok(record) => {
                                if self.taken == self.plain.len {
                                    self.plain.len = 0;
                                    self.taken = 0;
                                }
                                self.plain.extend(record.payload);
                            }
                            Err(e) => {
                                r = Err(invalid(e));
                                break;
                            }
                        }
                    }
                    r
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => encode_into(
                    &mut self.outgoing,
                    1024,
                    |out| encode.encode(out),
                    encode_needs,
                ),
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    // The records are in `outgoing`, which is written before any more input
                    // is read; rustls only needs to know they are taken.
                    transmit.done();
                    Ok(())
                }
                Ok(ConnectionState::BlockedHandshake) => {
                    stop = Some(Stop::Blocked);
                    Ok(())
                }
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                    self.eof = true;
                    stop = Some(Stop::PeerClosed);
                    Ok(())
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    stop = Some(Stop::Traffic);
                    match op.take() {
                        None | Some(Op::Process) => Ok(()),
                        // Room for every record's header, tag and content type, and a key
                        // update; grown if rustls asks for more.
                        Some(Op::Write(data)) => encode_into(
                            &mut self.outgoing,
                            data.len() + (data.len() / 16384 + 1) * 64 + 256,
                            |out| traffic.encrypt(data, out),
                            encrypt_needs,
                        ),
                        Some(Op::Close) => encode_into(
                            &mut self.outgoing,
                            64,
                            |out| traffic.queue_close_notify(out),
                            encrypt_needs,
                        ),
                    }
                }
                Ok(ConnectionState::ReadEarlyData(_)) => Err(invalid("unexpected early data")),
                Ok(_) => Err(invalid("unexpected TLS connection state")),
            };
            self.incoming.consume(discard);
            if let Err(e) = result {
                // Whatever rustls queued for the peer (a fatal alert) is still to be sent.
                self.queue_pending_records();
                return Err(e);
            }
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// After an error: moves the records rustls still has queued (an alert) to `outgoing`.
    fn queue_pending_records(&mut self) {
        for _ in 0..4 {
            // The same buffer as before: rustls may refer to handshake bytes it still holds
            // there. Queued records come out before any input is looked at.
            let UnbufferedStatus { state, .. } =
                self.conn.process_tls_records(self.incoming.filled_mut());
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = state else {
                return;
            };
            let queued = encode_into(
                &mut self.outgoing,
                1024,
                |out| encode.encode(out),
                encode_needs,
            );
            if queued.is_err() {
                return;
            }
        }
    }

    /// Writes `outgoing` to the socket; ready once all of it is written (and handed back).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len {
            let rest = self.outgoing.filled().get(self.sent..).unwrap_or_default();
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing.len = 0;
        self.sent = 0;
        self.outgoing.release_if_empty();
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into `incoming` (at most one record's worth more); the
    /// number of bytes read, 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            // Readiness first, so that a connection with nothing to read holds no buffer.
            ready!(self.tcp.poll_read_ready(cx))?;
            let room = self.incoming.room(READ_SIZE);
            let room = room.get_mut(..READ_SIZE).unwrap_or_default();
            match self.tcp.try_read(room) {
                Ok(n) => {
                    self.incoming.commit(n);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.incoming.release_if_empty();
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Sends `outgoing` without waiting for it: what the socket does not take now goes with
    /// the next write or flush.
    fn send_eagerly(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.poll_send(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plain.len {
                let available = this.plain.filled().get(this.taken..).unwrap_or_default();
                let n = available.len().min(buf.remaining());
                buf.put_slice(available.get(..n).unwrap_or_default());
                this.taken += n;
                if this.taken == this.plain.len {
                    this.plain.len = 0;
                    this.taken = 0;
                    this.plain.release_if_empty();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if !this.incoming.is_empty() {
                let stop = this.process(Op::Process)?;
                this.send_eagerly(cx)?;
                if this.taken < this.plain.len || stop == Stop::PeerClosed {
                    continue;
                }
                if stop == Stop::Blocked && this.incoming.len >= MAX_HANDSHAKE_INPUT {
                    return Poll::Ready(Err(invalid("TLS input over its limit")));
                }
            }
            // What was read is processed at the top of the loop.
            match this.poll_fill(cx) {
                Poll::Ready(r) => {
                    if r? == 0 {
                        this.eof = true;
                    }
                }
                Poll::Pending => {
                    // Waiting for the peer: nothing held that is empty.
                    this.release_empty();
                    return Poll::Pending;
                }
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        let data = data.get(..data.len().min(MAX_WRITE)).unwrap_or_default();
        match this.process(Op::Write(data))? {
            Stop::Traffic => {}
            Stop::Blocked | Stop::PeerClosed => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "TLS session cannot take application data",
                )))
            }
        }
        this.send_eagerly(cx)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            // close_notify once; a session that cannot take it any more is closed anyway.
            this.close_queued = true;
            let _ = this.process(Op::Close);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
impl TlsStream {
    /// Bytes of buffer capacity the stream holds now.
    fn buffers_held(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity() + self.plain.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const DEADLINE: Duration = Duration::from_secs(20);

    struct Setup {
        _dir: tempfile::TempDir,
        ca: std::path::PathBuf,
        listener: TcpListener,
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    }

    async fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (files, _) =
            crate::devpki::ensure(dir.path(), 1).unwrap_or_else(|e| panic!("dev PKI: {e}"));
        let server = crate::tls::server_config(&files).unwrap_or_else(|e| panic!("{e}"));
        let pki = dir.path().join("pki");
        let pem = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{e}"));
        let dev = fleet_certs::pki::Pki::open(&pki).unwrap_or_else(|e| panic!("{e}"));
        let entry = dev
            .entry(&fleet_certs::pki::device_id(1))
            .unwrap_or_else(|| panic!("no device 1"));
        let client = fleet_testkit::mqtt::client_config(
            &files.ca,
            &pem(&dev.cert_path(entry)),
            &pem(&dev.key_path(entry)),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Setup {
            _dir: dir,
            ca: files.ca.clone(),
            listener,
            server,
            client,
        }
    }

    async fn connect(
        s: &Setup,
        client: Arc<rustls::ClientConfig>,
    ) -> (
        io::Result<TlsStream>,
        io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
    ) {
        let addr = s.listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = async {
            let (tcp, _) = s.listener.accept().await?;
            TlsStream::accept(tcp, s.server.clone()).await
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::try_from("localhost")
                .unwrap_or_else(|e| panic!("{e}"));
            tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await
        };
        tokio::time::timeout(DEADLINE, async { tokio::join!(server, client) })
            .await
            .unwrap_or_else(|_| panic!("handshake not done within {DEADLINE:?}"))
    }

    #[tokio::test]
    async fn small_and_large_messages_cross_both_ways_and_an_idle_stream_holds_no_buffer() {
        let s = setup().await;
        let (server, client) = connect(&s, s.client.clone()).await;
        let (mut server, mut client) = (
            server.unwrap_or_else(|e| panic!("server: {e}")),
            client.unwrap_or_else(|e| panic!("client: {e}")),
        );
        assert!(server.peer_certificates().is_some_and(|c| !c.is_empty()));
        // Larger than a record and than one write's share, and not a multiple of either.
        let big: Vec<u8> = (0..200_001u32).map(|i| (i % 251) as u8).collect();
        let run = async {
            client.write_all(b"hello").await?;
            client.write_all(&big).await?;
            client.flush().await?;
            let mut got = vec![0u8; 5 + big.len()];
            server.read_exact(&mut got).await?;
            assert_eq!(got.get(..5), Some(&b"hello"[..]));
            assert!(got.get(5..) == Some(&big[..]), "server read other bytes");
            server.write_all(&big).await?;
            server.flush().await?;
            let mut back = vec![0u8; big.len()];
            client.read_exact(&mut back).await?;
            assert!(back == big, "client read other bytes");
            io::Result::Ok(())
        };
        tokio::time::timeout(DEADLINE, run)
            .await
            .unwrap_or_else(|_| panic!("exchange not done within {DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("{e}"));
        // Idle, as the connection loop leaves it: waiting to read with nothing to read.
        let waiting = poll_fn(|cx| {
            let mut b = [0u8; 16];
            let mut rb = ReadBuf::new(&mut b);
            Poll::Ready(Pin::new(&mut server).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        assert!(waiting, "the server read something nobody sent");
        assert_eq!(server.buffers_held(), 0, "an idle stream keeps a buffer");

        // A close_notify reads as the end of the stream.
        let run = async {
            client.shutdown().await?;
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await?;
            io::Result::Ok(rest)
        };
        let rest = tokio::time::timeout(DEADLINE, run)
            .await
            .unwrap_or_else(|_| panic!("no end of stream within {DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_fails_the_handshake() {
        let s = setup().await;
        let mut roots = rustls::RootCertStore::empty();
        for c in fleet_certs::files::read_certs(&s.ca).unwrap_or_else(|e| panic!("{e}")) {
            roots.add(c).unwrap_or_else(|e| panic!("{e}"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let anonymous = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (server, client) = connect(&s, Arc::new(anonymous)).await;
        assert!(
            server.is_err(),
            "the server accepted a client without a certificate"
        );
        // TLS 1.3: the client finishes first; its first read sees the server's alert.
        let mut client = client.unwrap_or_else(|e| panic!("client: {e}"));
        {
            let mut b = [0u8; 1];
            let read = tokio::time::timeout(DEADLINE, client.read(&mut b)).await;
            // The server's alert says why, rather than a bare end of stream.
            assert!(
                matches!(&read, Ok(Err(e)) if e.to_string().contains("alert")),
                "the client was not told: {read:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_handshake_is_refused_not_buffered() {
        let s = setup().await;
        let addr = s.listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = async {
            let (tcp, _) = s.listener.accept().await?;
            TlsStream::accept(tcp, s.server.clone()).await
        };
        let client = async {
            let mut tcp = TcpStream::connect(addr).await?;
            // A ClientHello claiming 16 MiB, then records of it until the server hangs up.
            let mut first = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
            first.resize(5 + 0x4000, 0);
            tcp.write_all(&first).await?;
            let mut more = vec![0x16, 0x03, 0x03, 0x40, 0x00];
            more.resize(5 + 0x4000, 0);
            for _ in 0..1024 {
                if tcp.write_all(&more).await.is_err() {
                    break;
                }
            }
            io::Result::Ok(())
        };
        let (server, _) = tokio::time::timeout(DEADLINE, async { tokio::join!(server, client) })
            .await
            .unwrap_or_else(|_| panic!("not refused within {DEADLINE:?}"));
        assert!(server.is_err(), "an oversized handshake was accepted");
    }
}
