//! The `prometheus` feature: a Prometheus recorder and a small `/metrics` HTTP endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind, Result};

use super::{collect, enable, scrape, DELIVERY_SECONDS, LATENCY_BUCKETS, PUBLISH_SECONDS};

/// Installs a Prometheus recorder as the process's `metrics` recorder (histograms with
/// [`LATENCY_BUCKETS`](super::LATENCY_BUCKETS)) and calls [`enable`]. Render with
/// `collect(); handle.render()`, or let [`serve`] do it.
///
/// # Errors
/// [`ErrorKind::Other`] when a recorder is already installed.
pub fn install() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PUBLISH_SECONDS.into()), &LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(DELIVERY_SECONDS.into()), &LATENCY_BUCKETS)
        })
        .map_err(|e| Error::new(ErrorKind::Other, format!("metrics buckets: {e}")))?
        .install_recorder()
        .map_err(|e| Error::new(ErrorKind::Other, format!("metrics recorder: {e}")))?;
    enable();
    Ok(handle)
}

/// A running `/metrics` endpoint; dropping it stops serving (the recorder stays installed).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    handle: PrometheusHandle,
    tasks: [JoinHandle<()>; 2],
}

impl MetricsServer {
    /// The address it listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The text exposition after [`collect`]: bus counters exact, consumer lag as the last
    /// scrape left it.
    pub fn render(&self) -> String {
        collect();
        self.handle.render()
    }

    /// What a scrape returns now: [`scrape`](super::scrape) (counters and consumer lag), then
    /// the text exposition.
    pub async fn scrape(&self) -> String {
        scrape().await;
        self.handle.render()
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Installs the recorder ([`install`]) and serves `GET /metrics` on `addr` in the Prometheus
/// text format, from a task on the current tokio runtime. Each scrape calls
/// [`scrape`](super::scrape) first, so bus counters are exact and consumer lag is read from
/// the brokers at scrape time.
///
/// ```no_run
/// # async fn f() -> busway::Result<()> {
/// let _metrics = busway::metrics::serve("127.0.0.1:9464".parse().unwrap()).await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// A recorder already installed; the address cannot be bound (the error names it).
pub async fn serve(addr: SocketAddr) -> Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::new(
            ErrorKind::Other,
            format!("metrics: cannot listen on {addr}"),
        )
        .with_source(e)
    })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let handle = install()?;
    let h = handle.clone();
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let _ = answer(stream, &h).await;
            });
        }
    });
    // Histogram samples wait in buffers until drained; drain them between scrapes too, so an
    // endpoint nobody scrapes does not grow.
    let h = handle.clone();
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            h.run_upkeep();
        }
    });
    Ok(MetricsServer {
        addr,
        handle,
        tasks: [accept, upkeep],
    })
}

/// One HTTP/1.x exchange: `GET /metrics` gets the exposition, anything else a 404.
async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // The request head only, bounded: a scrape's head is a few hundred bytes.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let path = line.split(|b| *b == b' ').nth(1).unwrap_or_default();
    let path = path.split(|b| *b == b'?').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET ") && path == b"/metrics" {
        scrape().await;
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "not found: try /metrics\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
