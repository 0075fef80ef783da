//! Network fixtures for tests, TCP proxies on 127.0.0.1 (port 0):
//! * [`CuttingProxy`], a flaky network: it cuts each connection after it has carried a given
//!   number of bytes towards the client;
//! * [`Relay`], a stable address in front of a server that restarts (a gateway killed and
//!   started again, a cloud broker stopped and started).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; it stops when dropped.
pub struct CuttingProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cuts: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    /// Forwards to `target`, cutting every connection after `cut_after` bytes downstream.
    pub async fn start(target: SocketAddr, cut_after: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cuts = Arc::new(AtomicU64::new(0));
        let counter = cuts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    if pipe(client, server, cut_after).await {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        Ok(CuttingProxy { addr, cuts, task })
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways; true when the connection was cut for its byte budget.
async fn pipe(client: TcpStream, server: TcpStream, cut_after: u64) -> bool {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut carried = 0u64;
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    let n = n.min((cut_after - carried) as usize).max(1);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return false;
                    }
                    carried += n as u64;
                    if carried >= cut_after {
                        return true;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = up => false,
        cut = down => cut,
    }
}

/// Where a [`Relay`] forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP address (a gateway on its port 0).
    Tcp(SocketAddr),
    /// A Unix socket (mosquitto, which cannot report a port 0 it was given).
    Unix(PathBuf),
}

/// A stable address for a server that restarts.
///
/// Clients that must find the server again at the same address after a restart (devices
/// reconnecting to a restarted gateway, a bridge to a restarted cloud broker) connect here.
/// The relay binds 127.0.0.1:0 once and keeps its listener for the whole test, so no other
/// process can take the port in between; each restarted server binds a fresh port 0 (or a
/// Unix socket) and the relay is pointed at it. With no target, or one that refuses,
/// connections are accepted and closed at once, which a client sees like a server that is
/// down (and [`Relay::refused`] counts). This replaces picking a
/// "free" port, releasing it and hoping to bind it again later, which races with every other
/// process on the machine.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<Target>>>,
    refused: Arc<AtomicU64>,
    /// Bumped by [`Relay::sever`]: every connection relayed before closes.
    severed: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Binds 127.0.0.1:0 and forwards to `target` (none yet: refuse). Needs a tokio runtime.
    pub fn start(target: Option<Target>) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let addr = listener.local_addr()?;
        let target = Arc::new(Mutex::new(target));
        let refused = Arc::new(AtomicU64::new(0));
        let (current, counter) = (target.clone(), refused.clone());
        let (severed, _) = tokio::sync::watch::channel(0u64);
        let cuts = severed.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = match current.lock() {
                    Ok(g) => g.clone(),
                    Err(p) => p.into_inner().clone(),
                };
                let counter = counter.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        relayed = relay(client, to) => if !relayed {
                            counter.fetch_add(1, Ordering::Relaxed);
                        },
                        // Severed: both sockets are dropped, so both ends see the connection
                        // close.
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Relay {
            addr,
            target,
            refused,
            severed,
            task,
        })
    }

    /// Connections closed so far for want of a server (no target, or it refused): a client
    /// has tried while the server was down.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Forwards new connections to `target` from now on (none: refuse them). Connections to
    /// the previous target stay as they are; when that server is gone they close.
    pub fn point_to(&self, target: Option<Target>) {
        match self.target.lock() {
            Ok(mut g) => *g = target,
            Err(p) => *p.into_inner() = target,
        }
    }

    /// Closes every connection relayed so far (a cable pulled: both ends see their connection
    /// drop). New connections go on to the current target; point it to `None` first to keep
    /// the link down.
    pub fn sever(&self) {
        self.severed.send_modify(|n| *n += 1);
    }

    /// `localhost:PORT`, for clients that check the server's name.
    pub fn address(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays one connection until either side closes; false when there was no server to relay
/// to (no target, or it refused).
async fn relay(mut client: TcpStream, to: Option<Target>) -> bool {
    match to {
        None => false,
        Some(Target::Tcp(addr)) => match TcpStream::connect(addr).await {
            Ok(mut server) => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                true
            }
            Err(_) => false,
        },
        Some(Target::Unix(path)) => match tokio::net::UnixStream::connect(&path).await {
            Ok(mut server) => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                true
            }
            Err(_) => false,
        },
    }
}
