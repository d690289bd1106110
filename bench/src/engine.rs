//! What both sides share: payloads, the paced / pipelined publish loop, per-subscriber tallies
//! and the wait for every delivery (or the verdict that some were lost).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use busway::{Error, ErrorKind, Result};
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use hdrhistogram::Histogram;

use super::Plan;

/// How long a side may go without a single new delivery, once publishing has ended, before
/// the missing messages are declared lost. Generous: the machine may be loaded.
const STALL: Duration = Duration::from_secs(10);

static ANCHOR: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since a process-wide anchor: send times travel in payloads as this, and both
/// ends of every measured path live in this process.
pub(crate) fn now_ns() -> u64 {
    ANCHOR.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// CPU seconds this process has used so far.
fn own_cpu_seconds() -> Option<f64> {
    super::broker::proc_cpu_seconds(std::process::id())
}

/// Makes the payloads one publisher sends.
#[derive(Debug, Clone)]
pub(crate) struct Payloads {
    template: Bytes,
    timed: bool,
}

impl Payloads {
    pub(crate) fn new(plan: &Plan) -> Payloads {
        Payloads {
            template: Bytes::from(vec![0x5au8; plan.payload]),
            timed: plan.timed(),
        }
    }

    /// The next payload: the shared template (no copy), or, when timed, a fresh buffer that
    /// starts with the send time (little-endian `now_ns`).
    pub(crate) fn next(&self) -> Bytes {
        if !self.timed {
            return self.template.clone();
        }
        let mut b = BytesMut::with_capacity(self.template.len());
        b.put_u64_le(now_ns());
        b.extend_from_slice(&self.template[8..]);
        b.freeze()
    }
}

/// The deliveries of one subscriber. Written by that subscriber's task alone.
#[derive(Debug)]
pub(crate) struct Tally {
    received: AtomicU64,
    errors: AtomicU64,
    /// Deliveries this subscriber must see (`u64::MAX` until known, in `--seconds` runs).
    expected: Arc<AtomicU64>,
    /// When the expected count was reached (`now_ns`), 0 before.
    done_ns: AtomicU64,
    hist: Option<Mutex<Histogram<u64>>>,
}

impl Tally {
    /// Counts one delivery; when timed, records its delay from the send time in the payload.
    pub(crate) fn record(&self, payload: &[u8]) {
        // One writer per tally: a plain load and store, no locked increment on the hot path.
        let n = self.received.load(Relaxed) + 1;
        self.received.store(n, Relaxed);
        if let Some(h) = &self.hist {
            let now = now_ns();
            let sent = sent_ns(payload, now);
            if let Ok(mut h) = h.lock() {
                h.saturating_record(now.saturating_sub(sent).max(1));
            }
        }
        if n == self.expected.load(Relaxed) {
            self.done_ns.store(now_ns(), Relaxed);
        }
    }

    /// Counts a failed ack or receive.
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    /// Counts deliveries the client itself reported as skipped (e.g. a lagging receiver).
    pub(crate) fn missed(&self, n: u64) {
        self.errors.fetch_add(n, Relaxed);
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
    pub(crate) samples: u64,
}

/// The measured outcome of one side of one shape.
#[derive(Debug, Clone)]
pub(crate) struct SideResult {
    /// What this side was (client, commands, connections).
    pub(crate) what: String,
    pub(crate) published: u64,
    /// Deliveries expected over all subscribers.
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    /// Failed acks / receives, and deliveries a client skipped.
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
    /// Broker CPU seconds spent during the side (user + system), when known.
    pub(crate) broker_cpu_s: Option<f64>,
    /// CPU seconds this bench process spent during the side (user + system, all threads):
    /// the client's cost, steadier than a rate when other work shares the machine.
    pub(crate) client_cpu_s: Option<f64>,
    pub(crate) latency: Option<Latency>,
    /// Timed runs: (axis position, delay in µs) at [`plot::curve_quantiles`](super::plot::curve_quantiles),
    /// for the latency chart of `--plot`.
    pub(crate) percentiles: Vec<(f64, f64)>,
    /// Drops the bus itself counted (`stats().dropped`; busway side only): a loss the bus
    /// did not count is a silent loss.
    pub(crate) bus_dropped: Option<u64>,
}

impl SideResult {
    /// Messages published per second, unless messages were lost.
    pub(crate) fn rate(&self) -> Option<f64> {
        (self.lost == 0 && self.errors == 0 && self.elapsed > Duration::ZERO)
            .then(|| self.published as f64 / self.elapsed.as_secs_f64())
    }

    /// Broker CPU seconds per million published messages.
    pub(crate) fn cpu_per_million(&self) -> Option<f64> {
        let cpu = self.broker_cpu_s?;
        (self.published > 0).then(|| cpu * 1e6 / self.published as f64)
    }

    /// This process's CPU microseconds per published message (publishing and delivering).
    pub(crate) fn client_us_per_msg(&self) -> Option<f64> {
        let cpu = self.client_cpu_s?;
        (self.published > 0).then(|| cpu * 1e6 / self.published as f64)
    }
}

/// One side's run: its subscribers' tallies and its clock.
#[derive(Debug)]
pub(crate) struct Run {
    plan: Plan,
    tallies: Vec<Arc<Tally>>,
    expected: Arc<AtomicU64>,
    start_ns: u64,
    start_cpu_s: Option<f64>,
}

impl Run {
    pub(crate) fn new(plan: &Plan) -> Run {
        let expected = Arc::new(AtomicU64::new(match plan.seconds {
            Some(_) => u64::MAX,
            None => plan.count,
        }));
        let tallies = (0..plan.subscribers)
            .map(|_| {
                Arc::new(Tally {
                    received: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    expected: expected.clone(),
                    done_ns: AtomicU64::new(0),
                    hist: plan.timed().then(|| {
                        Mutex::new(
                            Histogram::new_with_bounds(1, 60_000_000_000, 3)
                                .expect("valid histogram bounds"),
                        )
                    }),
                })
            })
            .collect();
        Run {
            plan: plan.clone(),
            tallies,
            expected,
            start_ns: 0,
            start_cpu_s: None,
        }
    }

    /// The tally of subscriber `i`.
    pub(crate) fn tally(&self, i: usize) -> Arc<Tally> {
        self.tallies[i].clone()
    }

    /// Starts the clock; returns the publishing deadline of a `--seconds` run.
    pub(crate) fn start(&mut self) -> Option<tokio::time::Instant> {
        self.start_ns = now_ns();
        self.start_cpu_s = own_cpu_seconds();
        self.plan.seconds.map(|s| tokio::time::Instant::now() + s)
    }

    /// How many messages each publisher sends (`u64::MAX` in a `--seconds` run).
    pub(crate) fn shares(&self) -> Vec<u64> {
        let p = self.plan.publishers.max(1) as u64;
        (0..p)
            .map(|i| match self.plan.seconds {
                Some(_) => u64::MAX,
                None => self.plan.count / p + u64::from(i < self.plan.count % p),
            })
            .collect()
    }

    /// Waits until every subscriber has every one of the `published` messages, or until no
    /// delivery arrived for a while, and measures the side.
    /// [`finish`](Self::finish) of a raw side, with the CPU seconds `broker` spent since
    /// `cpu_before` (what its `cpu_seconds` said when the side started); then stops the
    /// side's `readers`.
    pub(crate) async fn finish_with_cpu<T>(
        &self,
        what: String,
        published: u64,
        broker: &super::broker::Broker,
        cpu_before: Option<f64>,
        readers: Vec<tokio::task::JoinHandle<T>>,
    ) -> SideResult {
        let mut result = self.finish(what, published).await;
        let cpu_after = broker.cpu_seconds().await;
        result.broker_cpu_s = cpu_before.zip(cpu_after).map(|(a, b)| b - a);
        for r in readers {
            r.abort();
        }
        result
    }

    pub(crate) async fn finish(&self, what: String, published: u64) -> SideResult {
        self.expected.store(published, Relaxed);
        let mut last_total = u64::MAX;
        let mut last_progress = Instant::now();
        loop {
            let mut all_done = true;
            let mut total = 0;
            for t in &self.tallies {
                let got = t.received.load(Relaxed);
                total += got;
                if got >= published {
                    // Reached before the count was known (`--seconds`): stamp it now.
                    let _ = t.done_ns.compare_exchange(0, now_ns(), Relaxed, Relaxed);
                } else {
                    all_done = false;
                }
            }
            if all_done || (last_total == total && last_progress.elapsed() > STALL) {
                break;
            }
            if total != last_total {
                last_total = total;
                last_progress = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.measure(what, published)
    }

    fn measure(&self, what: String, published: u64) -> SideResult {
        let mut delivered = 0;
        let mut lost = 0;
        let mut errors = 0;
        let mut end_ns = now_ns();
        let mut hist: Option<Histogram<u64>> = None;
        if !self.tallies.is_empty() {
            end_ns = 0;
        }
        for t in &self.tallies {
            let got = t.received.load(Relaxed);
            delivered += got;
            lost += published.saturating_sub(got);
            errors += t.errors.load(Relaxed);
            let done = t.done_ns.load(Relaxed);
            end_ns = end_ns.max(if done == 0 { now_ns() } else { done });
            if let Some(h) = &t.hist {
                if let Ok(h) = h.lock() {
                    match &mut hist {
                        None => hist = Some(h.clone()),
                        Some(all) => {
                            let _ = all.add(&*h);
                        }
                    }
                }
            }
        }
        let hist = hist.filter(|h| !h.is_empty());
        let percentiles = hist.as_ref().map_or_else(Vec::new, |h| {
            super::plot::curve_quantiles()
                .map(|(x, q)| (x, h.value_at_quantile(q) as f64 / 1e3))
                .collect()
        });
        let latency = hist.map(|h| Latency {
            p50_us: h.value_at_quantile(0.50) as f64 / 1e3,
            p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
            p999_us: h.value_at_quantile(0.999) as f64 / 1e3,
            max_us: h.max() as f64 / 1e3,
            samples: h.len(),
        });
        SideResult {
            what,
            published,
            expected: published * self.tallies.len() as u64,
            delivered,
            lost,
            errors,
            elapsed: Duration::from_nanos(end_ns.saturating_sub(self.start_ns)),
            broker_cpu_s: None,
            client_cpu_s: self.start_cpu_s.zip(own_cpu_seconds()).map(|(a, b)| b - a),
            latency,
            percentiles,
            bus_dropped: None,
        }
    }
}

/// Publishes `share` messages (or until `deadline`) with up to `plan.inflight` publishes in
/// flight, paced at `plan.rate` when set, calling `publish` with each payload. Returns how
/// many publishes succeeded.
///
/// # Errors
/// The first failed publish.
pub(crate) async fn publish_loop<F, Fut>(
    plan: &Plan,
    share: u64,
    deadline: Option<tokio::time::Instant>,
    mut publish: F,
) -> Result<u64>
where
    F: FnMut(Bytes) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let payloads = Payloads::new(plan);
    let began = tokio::time::Instant::now();
    // Each publisher's share of the rate.
    let interval_ns = plan
        .rate
        .map(|r| (1e9 * plan.publishers.max(1) as f64 / r) as u64);
    let pace = move |i: u64| async move {
        if let Some(ns) = interval_ns {
            tokio::time::sleep_until(began + Duration::from_nanos(ns.saturating_mul(i))).await;
        }
        deadline.is_none_or(|d| tokio::time::Instant::now() < d)
    };
    let mut published = 0u64;
    if plan.inflight <= 1 {
        for i in 0..share {
            if !pace(i).await {
                break;
            }
            publish(payloads.next()).await?;
            published += 1;
        }
        return Ok(published);
    }
    let results = futures::stream::iter(0..share)
        .then(pace)
        .take_while(|go| std::future::ready(*go))
        .map(|_| publish(payloads.next()))
        .buffer_unordered(plan.inflight);
    let mut results = std::pin::pin!(results);
    while let Some(r) = results.next().await {
        r?;
        published += 1;
    }
    Ok(published)
}

/// Starts the clock and runs one publisher task per share, concurrently; adds up what they
/// published. `task(share, deadline)` is one publisher (usually a [`publish_loop`] over a
/// client it owns).
///
/// # Errors
/// The first publisher's error.
pub(crate) async fn publish_all<T, Fut>(run: &mut Run, task: T) -> Result<u64>
where
    T: Fn(u64, Option<tokio::time::Instant>) -> Fut,
    Fut: Future<Output = Result<u64>> + Send + 'static,
{
    let deadline = run.start();
    let tasks: Vec<_> = run
        .shares()
        .into_iter()
        .map(|share| tokio::spawn(task(share, deadline)))
        .collect();
    let mut total = 0;
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(Error::new(
                    ErrorKind::Other,
                    format!("a publisher task failed: {e}"),
                ));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// Wraps a client error as a busway error naming what failed.
pub(crate) fn client_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Connection, format!("{what}: {e}"))
}

/// The send time a bench payload carries in its first 8 bytes (little-endian nanoseconds of
/// [`now_ns`]); `now` for a payload too short to carry one.
pub(crate) fn sent_ns(payload: &[u8], now: u64) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(now)
}
