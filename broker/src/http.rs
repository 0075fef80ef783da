//! The operator's endpoint: `GET /metrics` (Prometheus text format) and `GET /health`, over
//! plain HTTP/1.1 on a local address. One request per connection, heads up to 8 KiB, 5 s to
//! send it: nothing a scraper needs more of, nothing a stray client can hold open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::metrics::Metrics;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint reads.
#[derive(Clone)]
pub struct Sources {
    /// Counters and gauges.
    pub metrics: Arc<Metrics>,
    /// The number of live connections (the connections gauge), as the assembly wires it.
    pub connections: Arc<dyn Fn() -> usize + Send + Sync>,
}

/// Binds `addr` and serves in a task; the bound address.
pub async fn start(addr: SocketAddr, sources: Sources) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "metrics endpoint listening");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    let s = sources.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(sock, &s).await {
                            debug!(error = %e, "metrics request failed");
                        }
                    });
                }
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(bound)
}

/// The response to a request line: status, content type, body.
pub fn respond(
    request_line: &str,
    s: &Sources,
    now_ms: u64,
) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            s.metrics.render((s.connections)(), now_ms),
        ),
        ("GET", "/health") => {
            let bridge = Metrics::get(&s.metrics.bridge_connected) == 1;
            (
                "200 OK",
                "application/json",
                format!(
                    "{{\"status\":\"ok\",\"connections\":{},\"bridge_connected\":{bridge},\"bridge_queue_depth\":{}}}\n",
                    (s.connections)(),
                    Metrics::get(&s.metrics.bridge_queue_depth)
                ),
            )
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    }
}

async fn serve(mut sock: TcpStream, s: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_HEAD {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("");
    let (status, ctype, body) = respond(line, s, fleet_proto::time::now_ms());
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_health_and_the_rest() {
        let s = Sources {
            metrics: Arc::new(Metrics::default()),
            connections: Arc::new(|| 0),
        };
        Metrics::inc(&s.metrics.acl_denials);
        let (st, ct, body) = respond("GET /metrics HTTP/1.1", &s, 0);
        assert_eq!(st, "200 OK");
        assert!(ct.starts_with("text/plain; version=0.0.4"));
        assert!(
            body.contains("\nfleet_gateway_acl_denials_total 1\n"),
            "{body}"
        );
        assert!(body.contains("# TYPE fleet_gateway_bridge_queue_depth gauge"));
        let (st, _, body) = respond("GET /health HTTP/1.0", &s, 0);
        assert_eq!(st, "200 OK");
        assert!(body.contains("\"status\":\"ok\""));
        assert_eq!(respond("GET /x HTTP/1.1", &s, 0).0, "404 Not Found");
        assert_eq!(
            respond("POST /metrics HTTP/1.1", &s, 0).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("", &s, 0).0, "405 Method Not Allowed");
    }
}
