//! A [`Bus`] wrapper that records, for one engine, which buses its traffic went through and
//! how long deliveries took. The engine still holds a plain `Arc<dyn Bus>`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use busway::{
    transport::{now_micros, BoxFuture, TransportSubscription},
    Bus, Capabilities, Delivery, Message, Pattern, Result, Router, StatsSnapshot, SubscribeOptions,
    Subscription,
};
use futures::StreamExt;
use hdrhistogram::Histogram;

/// Latency histograms' range: 1 µs to 10 minutes, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

/// What one engine did on the buses.
#[derive(Default)]
pub struct UsageCounts {
    /// Messages published, per bus.
    pub published: BTreeMap<String, u64>,
    /// Messages received, per bus they came from.
    pub received: BTreeMap<String, u64>,
    /// Subscriptions held, per bus they listen on.
    pub subscriptions: BTreeMap<String, u64>,
    /// Publish -> deliver latency in µs, per bus.
    pub latency: BTreeMap<String, Histogram<u64>>,
    /// Deliveries acked (the ack returned `Ok`).
    pub acked: u64,
    /// Errors seen (publish failures, payloads that did not decode).
    pub errors: u64,
    /// The first error's text.
    pub first_error: Option<String>,
}

impl fmt::Debug for UsageCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageCounts")
            .field("published", &self.published)
            .field("received", &self.received)
            .field("subscriptions", &self.subscriptions)
            .field("acked", &self.acked)
            .field("errors", &self.errors)
            .finish()
    }
}

impl UsageCounts {
    /// Total messages received.
    pub fn total_received(&self) -> u64 {
        self.received.values().sum()
    }

    /// Total messages published.
    pub fn total_published(&self) -> u64 {
        self.published.values().sum()
    }
}

/// Shared, lockable [`UsageCounts`].
#[derive(Debug, Default)]
pub struct Usage(Mutex<UsageCounts>);

impl Usage {
    /// The counts, locked.
    pub fn lock(&self) -> MutexGuard<'_, UsageCounts> {
        // A panic elsewhere while holding the lock leaves plain counters: still readable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an error.
    pub fn error(&self, e: &dyn fmt::Display) {
        let mut u = self.lock();
        u.errors += 1;
        if u.first_error.is_none() {
            u.first_error = Some(e.to_string());
        }
    }

    fn delivered(&self, router: &Router, delivery: &Delivery) {
        let m = delivery.message();
        // A mirrored topic counts on its first bus.
        let bus = match router.route(&m.topic) {
            Ok(buses) => buses.first().map_or_else(String::new, |b| b.to_string()),
            Err(_) => "?".to_string(),
        };
        let mut u = self.lock();
        if let Some(sent) = m.headers.timestamp_us {
            let micros = now_micros().saturating_sub(sent).max(1);
            u.latency
                .entry(bus.clone())
                .or_insert_with(histogram)
                .saturating_record(micros);
        }
        *u.received.entry(bus).or_default() += 1;
    }
}

/// A router seen through one engine: every publish and delivery is recorded in its
/// [`Usage`], and every publish is stamped with the send time.
#[derive(Debug)]
pub struct TrackedBus {
    router: Arc<Router>,
    usage: Arc<Usage>,
}

impl TrackedBus {
    /// Wraps `router`, recording into `usage`.
    pub fn new(router: Arc<Router>, usage: Arc<Usage>) -> TrackedBus {
        TrackedBus { router, usage }
    }
}

#[async_trait]
impl Bus for TrackedBus {
    fn name(&self) -> &str {
        self.router.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.router.capabilities()
    }

    fn publish(&self, message: Message) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let message = message.stamped();
            let buses = self.router.route(&message.topic)?;
            self.router.publish(message).await?;
            let mut u = self.usage.lock();
            for bus in buses.iter() {
                *u.published.entry(bus.to_string()).or_default() += 1;
            }
            Ok(())
        })
    }

    async fn subscribe(&self, pattern: Pattern, options: SubscribeOptions) -> Result<Subscription> {
        let sub = self.router.subscribe(pattern.clone(), options).await?;
        {
            let mut u = self.usage.lock();
            // The buses the router listens on for this pattern.
            for bus in self.router.table().buses_for_pattern(&pattern) {
                *u.subscriptions.entry(bus.to_string()).or_default() += 1;
            }
        }
        let counters = sub.counters().clone();
        let router = self.router.clone();
        let usage = self.usage.clone();
        let recorded = sub.map(move |d| {
            usage.delivered(&router, &d);
            d
        });
        Ok(Subscription::from_stream(pattern, recorded, counters))
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        self.router.request(message.stamped(), timeout).await
    }

    async fn flush(&self) -> Result<()> {
        self.router.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.router.close().await
    }

    fn stats(&self) -> StatsSnapshot {
        self.router.stats()
    }
}
