//! A flaky network for tests: a TCP proxy on 127.0.0.1 that forwards to a target and cuts each
//! connection after it has carried a given number of bytes towards the client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
