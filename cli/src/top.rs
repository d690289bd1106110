//! `busway top`: a live per-bus table read from a process's `/metrics` endpoint (rates in and
//! out, drops, delivery latency percentiles, health), refreshed in place.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use busway::metrics::{DELIVERED, DELIVERY_SECONDS, DROPPED, ERRORS, HEALTH, PUBLISHED};
use busway::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::text::table;

/// One series of the text exposition: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name (with `_bucket`, `_sum`, `_count` suffixes for histograms).
    pub name: String,
    /// Labels in the order they were written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text exposition format (comments and malformed lines skipped).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        loop {
            // key
            let mut key = String::new();
            while let Some(&(i, c)) = chars.peek() {
                if c == '}' {
                    end = Some(i);
                    break;
                }
                chars.next();
                if c == '=' {
                    break;
                }
                if c != ',' && c != ' ' {
                    key.push(c);
                }
            }
            if end.is_some() {
                break;
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.push((key, value));
        }
        &body[end? + 1..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// What `top` keeps per bus from one scrape.
#[derive(Debug, Clone, Default)]
struct BusTotals {
    transport: String,
    mode: String,
    health: String,
    published: f64,
    delivered: f64,
    dropped: f64,
    errors: f64,
    /// Cumulative delivery-latency bucket counts by upper bound.
    buckets: BTreeMap<u64, (f64, f64)>,
}

/// Sums the samples per (app, bus).
fn per_bus(samples: &[Sample]) -> BTreeMap<(String, String), BusTotals> {
    let mut buses: BTreeMap<(String, String), BusTotals> = BTreeMap::new();
    let bucket_name = format!("{DELIVERY_SECONDS}_bucket");
    for s in samples {
        let bus = s.label("bus");
        if bus.is_empty() {
            continue;
        }
        let t = buses
            .entry((s.label("app").to_string(), bus.to_string()))
            .or_default();
        if t.transport.is_empty() {
            t.transport = s.label("transport").to_string();
            t.mode = s.label("mode").to_string();
        }
        match s.name.as_str() {
            n if n == PUBLISHED => t.published += s.value,
            n if n == DELIVERED => t.delivered += s.value,
            n if n == DROPPED => t.dropped += s.value,
            n if n == ERRORS => t.errors += s.value,
            n if n == HEALTH && s.value >= 1.0 => t.health = s.label("state").to_string(),
            n if n == bucket_name => {
                let le: f64 = match s.label("le") {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or(f64::INFINITY),
                };
                // Keyed by the bound's bits: bounds are positive, so their order is kept.
                let e = t.buckets.entry(le.to_bits()).or_insert((le, 0.0));
                e.1 += s.value;
            }
            _ => {}
        }
    }
    buses
}

/// The `q` quantile of the samples that fell in the buckets between two scrapes, with linear
/// interpolation inside a bucket (as PromQL's `histogram_quantile`); `None` without samples.
fn quantile(
    now: &BTreeMap<u64, (f64, f64)>,
    before: &BTreeMap<u64, (f64, f64)>,
    q: f64,
) -> Option<f64> {
    let deltas: Vec<(f64, f64)> = now
        .iter()
        .map(|(k, (le, c))| (*le, c - before.get(k).map_or(0.0, |b| b.1)))
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for (le, cum) in deltas {
        if cum >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = cum - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = cum;
    }
    None
}

/// Fetches `url` (`http://host:port/path`) with a plain HTTP/1.1 GET.
///
/// # Errors
/// A URL that is not `http://`, a connection or read failure, a status other than 200.
pub async fn fetch(url: &str) -> Result<String> {
    let bad = || {
        Error::new(
            ErrorKind::Other,
            format!("--metrics-url {url:?}: expected http://HOST:PORT/PATH"),
        )
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if host.is_empty() {
        return Err(bad());
    }
    let io = |e: std::io::Error| Error::new(ErrorKind::Other, format!("{url}: {e}"));
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host).await.map_err(io)?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await.map_err(io)?;
        Ok::<_, Error>(body)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, format!("{url}: no answer in 5s")))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        return Err(Error::new(ErrorKind::Other, format!("{url}: {status}")));
    }
    Ok(body.to_string())
}

/// One scrape kept for the next frame's rates.
#[derive(Debug)]
pub struct Scrape {
    at: Instant,
    buses: BTreeMap<(String, String), BusTotals>,
}

impl Scrape {
    /// A scrape of `text`, taken at `at`.
    pub fn new(text: &str, at: Instant) -> Scrape {
        Scrape {
            at,
            buses: per_bus(&parse_exposition(text)),
        }
    }
}

/// The table for `now`, with rates and percentiles over the time since `before`.
pub fn render(now: &Scrape, before: Option<&Scrape>) -> String {
    let secs = before.map(|b| now.at.duration_since(b.at).as_secs_f64());
    let rows: Vec<Vec<String>> = now
        .buses
        .iter()
        .map(|((app, bus), t)| {
            let prev = before.and_then(|b| b.buses.get(&(app.clone(), bus.clone())));
            let rate = |f: fn(&BusTotals) -> f64| match (prev, secs) {
                (Some(p), Some(s)) if s > 0.0 => format!("{:.1}", (f(t) - f(p)).max(0.0) / s),
                _ => "-".to_string(),
            };
            let empty = BTreeMap::new();
            let pct = |q: f64| {
                quantile(&t.buckets, prev.map_or(&empty, |p| &p.buckets), q)
                    .map_or("-".to_string(), |v| format!("{:.3}", v * 1000.0))
            };
            vec![
                app.clone(),
                bus.clone(),
                t.transport.clone(),
                t.mode.clone(),
                if t.health.is_empty() {
                    "-".into()
                } else {
                    t.health.clone()
                },
                rate(|t| t.published),
                rate(|t| t.delivered),
                format!("{}", t.dropped),
                rate(|t| t.dropped),
                format!("{}", t.errors),
                pct(0.5),
                pct(0.99),
            ]
        })
        .collect();
    table(
        &[
            "app",
            "bus",
            "transport",
            "mode",
            "health",
            "in/s",
            "out/s",
            "dropped",
            "drop/s",
            "errors",
            "p50 ms",
            "p99 ms",
        ],
        &rows,
    )
}

/// Runs `top` against `url`, writing a frame every `interval` to stdout, `frames` times (or
/// until Ctrl-C when `None`).
///
/// # Errors
/// A bad URL. Failed scrapes are shown in the frame and retried.
pub async fn run(url: &str, interval: Duration, frames: Option<u64>) -> Result<()> {
    let mut before: Option<Scrape> = None;
    let mut shown = 0u64;
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let mut frame = String::new();
        // Home and clear: the table is redrawn in place.
        frame.push_str("\x1b[H\x1b[2J");
        let _ = writeln!(
            frame,
            "busway top: {url} every {:.1}s (Ctrl-C quits)\n",
            interval.as_secs_f64()
        );
        match fetch(url).await {
            Ok(text) => {
                let now = Scrape::new(&text, Instant::now());
                frame.push_str(&render(&now, before.as_ref()));
                before = Some(now);
            }
            Err(e) if e.message().contains("expected http://") => return Err(e),
            Err(e) => {
                let _ = writeln!(frame, "scrape failed: {e}");
            }
        }
        let mut out = tokio::io::stdout();
        let _ = out.write_all(frame.as_bytes()).await;
        let _ = out.flush().await;
        shown += 1;
        if frames.is_some_and(|n| shown >= n) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes_and_infinities() {
        let s = parse_exposition(
            "# TYPE x counter\nx{a=\"1\",b=\"q\\\"uote\"} 3\ny 4.5\nh_bucket{le=\"+Inf\"} 7\n",
        );
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0].labels,
            vec![("a".into(), "1".into()), ("b".into(), "q\"uote".into())]
        );
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].name, "y");
        assert_eq!(s[2].label("le"), "+Inf");
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        let b = |v: &[(f64, f64)]| v.iter().map(|(le, c)| (le.to_bits(), (*le, *c))).collect();
        let now = b(&[(0.001, 50.0), (0.01, 100.0), (f64::INFINITY, 100.0)]);
        let p50 = quantile(&now, &BTreeMap::new(), 0.5).unwrap();
        assert!((p50 - 0.001).abs() < 1e-12);
        let p75 = quantile(&now, &BTreeMap::new(), 0.75).unwrap();
        assert!((p75 - 0.0055).abs() < 1e-9);
    }
}
