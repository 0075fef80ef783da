//! The operator's endpoint: `GET /metrics` (Prometheus text format) and `GET /health`, over
//! plain HTTP/1.1 on a local address. One request per connection, heads up to 8 KiB, 5 s to
//! send it: nothing a scraper needs more of, nothing a stray client can hold open.
//!
//! `/health` answers `200` when every check passes and `503` naming the failed ones otherwise:
//!
//! * `listener`: the MQTT listener's accept loop is running.
//! * `store`: the store takes a write. Each request makes one small committed write (synced like
//!   any other), so a read-only or full disk, an I/O error or a store stuck for longer than
//!   [`STORE_PROBE_TIMEOUT`] shows now, not at the next device message. (Watching the outcome of
//!   recent writes instead would say nothing on an idle gateway.)
//! * `bridge`: connected upstream, when a bridge is configured (`not configured` passes).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::metrics::Metrics;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `/health` waits for the store's probe write before calling the store failed.
pub(crate) const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoint reads.
#[derive(Clone)]
pub(crate) struct Sources {
    /// Counters and gauges.
    pub metrics: Arc<Metrics>,
    /// The number of live connections (the connections gauge), as the assembly wires it.
    pub connections: Arc<dyn Fn() -> usize + Send + Sync>,
    /// What `/health` checks.
    pub health: HealthSources,
}

/// A probe write into the store: `Ok` once committed, `Err` with the reason otherwise.
pub(crate) type StoreProbe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Where `/health` looks.
#[derive(Clone)]
pub(crate) struct HealthSources {
    /// True while the MQTT listener's accept loop runs.
    pub listening: Arc<AtomicBool>,
    /// Proves the store writable.
    pub store_probe: StoreProbe,
    /// Whether a bridge is configured; then it must be connected upstream (the
    /// `bridge_connected` gauge).
    pub bridge_configured: bool,
}

/// The outcome of the health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthReport {
    /// The accept loop runs.
    pub listener: bool,
    /// The store's probe write: `Err` says why it failed.
    pub store: Result<(), String>,
    /// `None` without a bridge; otherwise whether it is connected upstream.
    pub bridge: Option<bool>,
}

impl HealthReport {
    /// Runs the checks (the store's probe waits at most [`STORE_PROBE_TIMEOUT`]).
    pub(crate) async fn check(h: &HealthSources, metrics: &Metrics) -> Self {
        let store = match tokio::time::timeout(STORE_PROBE_TIMEOUT, (h.store_probe)()).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {} s",
                STORE_PROBE_TIMEOUT.as_secs()
            )),
        };
        HealthReport {
            listener: h.listening.load(Ordering::Relaxed),
            store,
            bridge: h
                .bridge_configured
                .then(|| Metrics::get(&metrics.bridge_connected) == 1),
        }
    }

    /// The checks that failed, by name.
    pub(crate) fn failed(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.listener {
            out.push("listener");
        }
        if self.store.is_err() {
            out.push("store");
        }
        if self.bridge == Some(false) {
            out.push("bridge");
        }
        out
    }

    /// `200 OK` when every check passed, `503 Service Unavailable` otherwise, with a JSON body:
    /// `status` (`ok` or `unavailable`), `failed` (the names), `checks` (each one's word) and
    /// the figures an operator looks at next.
    pub(crate) fn response(
        &self,
        connections: usize,
        bridge_queue_depth: u64,
    ) -> (&'static str, String) {
        let failed = self.failed();
        let body = serde_json::json!({
            "status": if failed.is_empty() { "ok" } else { "unavailable" },
            "failed": failed,
            "checks": {
                "listener": if self.listener { "ok" } else { "not accepting connections" },
                "store": match &self.store {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("write failed: {e}"),
                },
                "bridge": match self.bridge {
                    None => "not configured",
                    Some(true) => "ok",
                    Some(false) => "not connected upstream",
                },
            },
            "connections": connections,
            "bridge_connected": self.bridge == Some(true),
            "bridge_queue_depth": bridge_queue_depth,
        });
        let status = if failed.is_empty() {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        (status, format!("{body}\n"))
    }
}

/// Binds `addr` and serves in a task; the bound address.
pub(crate) async fn start(addr: SocketAddr, sources: Sources) -> std::io::Result<SocketAddr> {
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
pub(crate) async fn respond(
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
            let report = HealthReport::check(&s.health, &s.metrics).await;
            let (status, body) = report.response(
                (s.connections)(),
                Metrics::get(&s.metrics.bridge_queue_depth),
            );
            (status, "application/json", body)
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
    let (status, ctype, body) = respond(line, s, fleet_proto::time::now_ms()).await;
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sources(listening: bool, store: Result<(), &'static str>, bridge: bool) -> Sources {
        let probe: StoreProbe =
            Arc::new(move || Box::pin(async move { store.map_err(str::to_owned) }));
        Sources {
            metrics: Arc::new(Metrics::default()),
            connections: Arc::new(|| 0),
            health: HealthSources {
                listening: Arc::new(AtomicBool::new(listening)),
                store_probe: probe,
                bridge_configured: bridge,
            },
        }
    }

    async fn health(s: &Sources) -> (&'static str, serde_json::Value) {
        let (st, ct, body) = respond("GET /health HTTP/1.0", s, 0).await;
        assert_eq!(ct, "application/json");
        (st, serde_json::from_str(&body).unwrap())
    }

    #[tokio::test]
    async fn metrics_and_the_rest() {
        let s = sources(true, Ok(()), false);
        Metrics::inc(&s.metrics.acl_denials);
        let (st, ct, body) = respond("GET /metrics HTTP/1.1", &s, 0).await;
        assert_eq!(st, "200 OK");
        assert!(ct.starts_with("text/plain; version=0.0.4"));
        assert!(
            body.contains("\nfleet_gateway_acl_denials_total 1\n"),
            "{body}"
        );
        assert!(body.contains("# TYPE fleet_gateway_bridge_queue_depth gauge"));
        assert_eq!(respond("GET /x HTTP/1.1", &s, 0).await.0, "404 Not Found");
        assert_eq!(
            respond("POST /metrics HTTP/1.1", &s, 0).await.0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("", &s, 0).await.0, "405 Method Not Allowed");
    }

    #[tokio::test]
    async fn healthy_without_a_bridge_and_with_a_connected_one() {
        let (st, h) = health(&sources(true, Ok(()), false)).await;
        assert_eq!(st, "200 OK");
        assert_eq!(h["status"], "ok");
        assert_eq!(h["failed"], serde_json::json!([]));
        assert_eq!(h["checks"]["bridge"], "not configured");
        assert_eq!(h["checks"]["store"], "ok");

        let s = sources(true, Ok(()), true);
        Metrics::set(&s.metrics.bridge_connected, 1);
        let (st, h) = health(&s).await;
        assert_eq!(st, "200 OK");
        assert_eq!(h["checks"]["bridge"], "ok");
        assert_eq!(h["bridge_connected"], true);
    }

    #[tokio::test]
    async fn each_failed_check_is_a_503_naming_it() {
        let (st, h) = health(&sources(false, Ok(()), false)).await;
        assert_eq!(st, "503 Service Unavailable");
        assert_eq!(h["status"], "unavailable");
        assert_eq!(h["failed"], serde_json::json!(["listener"]));

        let (st, h) = health(&sources(true, Err("disk I/O error"), false)).await;
        assert_eq!(st, "503 Service Unavailable");
        assert_eq!(h["failed"], serde_json::json!(["store"]));
        assert_eq!(h["checks"]["store"], "write failed: disk I/O error");

        // Configured but (still or again) not connected upstream.
        let (st, h) = health(&sources(true, Ok(()), true)).await;
        assert_eq!(st, "503 Service Unavailable");
        assert_eq!(h["failed"], serde_json::json!(["bridge"]));
        assert_eq!(h["checks"]["bridge"], "not connected upstream");

        let (st, h) = health(&sources(false, Err("read-only"), true)).await;
        assert_eq!(st, "503 Service Unavailable");
        assert_eq!(
            h["failed"],
            serde_json::json!(["listener", "store", "bridge"])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_does_not_answer_fails_the_check() {
        let mut s = sources(true, Ok(()), false);
        s.health.store_probe = Arc::new(|| Box::pin(std::future::pending()));
        let (st, h) = health(&s).await;
        assert_eq!(st, "503 Service Unavailable");
        assert_eq!(h["failed"], serde_json::json!(["store"]));
    }
}
