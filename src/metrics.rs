//! Metrics: counters, gauges and histograms of every router and its buses, through the
//! [`metrics`](https://docs.rs/metrics) facade.
//!
//! # What is recorded, and when
//! - **At scrape time** ([`collect`]): each bus's counters ([`StatsSnapshot`]:
//!   published, delivered, dropped, errors, reconnects, ...), its health and connections, each
//!   router's reloads and table generation, and each router subscription's queue depth. These
//!   are read from the counters every transport already keeps, so they cost nothing between
//!   scrapes and need nothing from a transport.
//! - **On the hot path, once [`enable`] was called**: the publish duration (call to ack or
//!   write, in the router's publish path) and the end-to-end delivery latency (now minus the
//!   message's `timestamp_us` header, where a router subscription hands a delivery out), of
//!   one publish and one delivery in every [`latency_sampling`] per thread (default
//!   [`DEFAULT_LATENCY_SAMPLING`]; [`set_latency_sampling`]`(1)` times every one). The
//!   histograms' `_count` is therefore the sampled count: message counts are the counters.
//!   Until [`enable`] the router's publish path takes one relaxed atomic load more, nothing
//!   else; after it, a thread-local countdown more.
//! - **At scrape time, from the brokers** ([`collect_lag`]): each stream-mode bus's consumer
//!   lag and pending per group ([`Bus::consumer_lag`]): broker round trips, never per message.
//!
//! Every series is labelled by `app`, `bus`, `transport` and `mode`; never by topic (topics
//! are unbounded). Subscription gauges add the subscription's `pattern` and `group`, which
//! code chooses and which are therefore bounded. The names are the `pub const`s below;
//! docs/OBSERVABILITY.md says what each answers.
//!
//! # Exporting
//! With the `prometheus` feature, [`serve`] installs a Prometheus recorder and serves
//! `/metrics` in one line. With a recorder of your own, call [`enable`] once and await
//! [`scrape`] before each export (or on an interval); [`collect`] alone skips the consumer
//! lag.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use ::metrics::{Histogram, Label};
use parking_lot::{Mutex, RwLock};

use crate::bus::{Bus, Mode};
use crate::stats::{GroupLag, Health, StatsSnapshot};

/// Messages accepted by a bus's `publish` (counter).
pub const PUBLISHED: &str = "busway_published_total";
/// Messages handed to subscribers (counter).
pub const DELIVERED: &str = "busway_delivered_total";
/// Messages dropped by an overflow policy or a client library (counter).
pub const DROPPED: &str = "busway_dropped_total";
/// Messages delivered again: nack, ack timeout, reclaimed (counter).
pub const REDELIVERED: &str = "busway_redelivered_total";
/// Failed operations (counter).
pub const ERRORS: &str = "busway_errors_total";
/// Incoming frames that did not decode (counter).
pub const DECODE_ERRORS: &str = "busway_decode_errors_total";
/// Deliveries acked, stream mode (counter).
pub const ACKED: &str = "busway_acked_total";
/// Deliveries nacked, stream mode (counter).
pub const NACKED: &str = "busway_nacked_total";
/// Foreign payloads (not busway frames) delivered as header-less messages (counter).
pub const UNFRAMED: &str = "busway_unframed_total";
/// Reconnections after a failure (counter).
pub const RECONNECTS: &str = "busway_reconnects_total";
/// Entries moved to a dead-letter topic (counter).
pub const DEAD_LETTERED: &str = "busway_dead_lettered_total";
/// Mirror copies dropped by a de-duplication window (counter).
pub const DUPLICATES: &str = "busway_duplicates_total";
/// Connections to the broker open now (gauge).
pub const CONNECTIONS: &str = "busway_connections";
/// 1 for the bus's current health, 0 for the others; label `state` = up, connecting,
/// closed (gauge).
pub const HEALTH: &str = "busway_bus_health";
/// Seconds from a publish call to its ack (stream) or write (broadcast) (histogram).
pub const PUBLISH_SECONDS: &str = "busway_publish_duration_seconds";
/// Seconds from a message's `timestamp_us` to its hand-out by a router subscription
/// (histogram; messages without a timestamp are not counted).
pub const DELIVERY_SECONDS: &str = "busway_delivery_latency_seconds";
/// Deliveries waiting in a router subscription's queue, per bus it listens on (gauge).
pub const QUEUE_DEPTH: &str = "busway_subscription_queue_depth";
/// Reloads a router applied (counter, label `app`).
pub const RELOADS: &str = "busway_router_reloads_total";
/// The generation of a router's live table: 0 at build, one more per reload (gauge).
pub const GENERATION: &str = "busway_router_generation";
/// Routing failures the router itself decides: no route, closed (counter, label `app`).
pub const ROUTER_ERRORS: &str = "busway_router_errors_total";
/// `traceparent` headers that did not parse and were ignored (counter).
pub const TRACE_MALFORMED: &str = "busway_trace_malformed_total";

/// Entries stored and not yet delivered to a consumer group, per `group`, from the broker at
/// scrape time ([`collect_lag`]) (gauge).
pub const CONSUMER_LAG: &str = "busway_consumer_lag";
/// Entries delivered to a consumer group and not yet acked, per `group`, from the broker at
/// scrape time ([`collect_lag`]) (gauge).
pub const CONSUMER_PENDING: &str = "busway_consumer_pending";

/// How long [`collect_lag`] waits for one bus's broker before keeping its previous values.
pub const LAG_TIMEOUT: Duration = Duration::from_secs(2);

/// Bucket bounds of both histograms, in seconds: 10 µs to 5 s.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

static ENABLED: AtomicBool = AtomicBool::new(false);

/// One publish and one delivery in this many (per thread) is timed into the histograms by
/// default: the clock reads, the boxed future and the histogram record cost a memory
/// publish about as much as the publish itself, and 1 in 32 still gives a quantile from
/// every few hundred milliseconds of traffic at 1,000 messages/s.
pub const DEFAULT_LATENCY_SAMPLING: u32 = 32;

static SAMPLING: AtomicU32 = AtomicU32::new(DEFAULT_LATENCY_SAMPLING);

thread_local! {
    static COUNTDOWN: Cell<u32> = const { Cell::new(0) };
}

/// Times one publish and one delivery in every `every` (per thread) into the latency
/// histograms; `1` (or `0`) times each one.
pub fn set_latency_sampling(every: u32) {
    SAMPLING.store(every.max(1), Relaxed);
}

/// One publish and one delivery in this many is timed (see [`set_latency_sampling`]).
pub fn latency_sampling() -> u32 {
    SAMPLING.load(Relaxed)
}

/// Whether this publish or delivery is one of the timed ones: the first of each run of
/// [`latency_sampling`] on this thread.
#[inline]
pub(crate) fn sampled() -> bool {
    COUNTDOWN.with(|c| match c.get() {
        0 => {
            c.set(SAMPLING.load(Relaxed) - 1);
            true
        }
        n => {
            c.set(n - 1);
            false
        }
    })
}

/// Turns on the hot-path histograms (publish duration, delivery latency) for every router in
/// the process, and describes the metrics to the installed recorder. Call it after installing
/// a recorder; [`serve`] and [`install`] call it.
pub fn enable() {
    ENABLED.store(true, Relaxed);
    describe();
}

/// Whether [`enable`] was called.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(PUBLISHED, "Messages accepted by publish");
    describe_counter!(DELIVERED, "Messages handed to subscribers");
    describe_counter!(DROPPED, "Messages dropped by an overflow policy or client");
    describe_counter!(REDELIVERED, "Messages delivered again");
    describe_counter!(ERRORS, "Failed operations");
    describe_counter!(
        UNFRAMED,
        "Foreign payloads delivered as header-less messages"
    );
    describe_counter!(DECODE_ERRORS, "Incoming frames that did not decode");
    describe_counter!(RECONNECTS, "Reconnections after a failure");
    describe_counter!(DEAD_LETTERED, "Entries moved to a dead-letter topic");
    describe_counter!(DUPLICATES, "Mirror copies dropped by de-duplication");
    describe_gauge!(CONNECTIONS, "Connections to the broker open now");
    describe_gauge!(HEALTH, "1 for the bus's current health state");
    describe_histogram!(
        PUBLISH_SECONDS,
        Unit::Seconds,
        "Publish call to ack or write"
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "Message timestamp to hand-out by a subscription"
    );
    describe_gauge!(QUEUE_DEPTH, "Deliveries waiting in a subscription queue");
    describe_counter!(RELOADS, "Router reloads applied");
    describe_gauge!(GENERATION, "Generation of the router's live table");
    describe_counter!(ROUTER_ERRORS, "Routing failures: no route, closed");
    describe_counter!(TRACE_MALFORMED, "traceparent headers ignored as malformed");
    describe_gauge!(
        CONSUMER_LAG,
        "Entries not yet delivered to a consumer group"
    );
    describe_gauge!(
        CONSUMER_PENDING,
        "Entries delivered to a consumer group and not acked"
    );
}

/// Something [`collect`] reads at scrape time (a router).
pub(crate) trait Source: Send + Sync {
    fn collect(&self);

    /// The stream-mode buses whose consumer lag [`collect_lag`] asks for, with their labels.
    fn lag_buses(&self) -> Vec<(BusLabels, Arc<dyn Bus>)> {
        Vec::new()
    }
}

static SOURCES: Mutex<Vec<Weak<dyn Source>>> = Mutex::new(Vec::new());

/// Registers a source for [`collect`]; it is forgotten once dropped.
pub(crate) fn register(source: Weak<dyn Source>) {
    let mut all = SOURCES.lock();
    all.retain(|s| s.strong_count() > 0);
    all.push(source);
}

/// Reads every live router's bus counters, health, subscription queue depths, reloads and
/// generation into the installed recorder. [`serve`] calls it at each scrape; with a recorder
/// of your own, call it before each export. Counters are set to the value the buses hold
/// (summed over routers with the same labels), so calling it more often changes nothing.
pub fn collect() {
    for s in live_sources() {
        s.collect();
    }
}

fn live_sources() -> Vec<Arc<dyn Source>> {
    let mut all = SOURCES.lock();
    all.retain(|s| s.strong_count() > 0);
    all.iter().filter_map(Weak::upgrade).collect()
}

/// The groups whose lag series were set last, per bus, so a group gone from the broker
/// reads 0 rather than its last value.
static LAG_SERIES: Mutex<BTreeMap<BusLabels, BTreeSet<String>>> = Mutex::new(BTreeMap::new());

/// Asks the broker of every live router's stream-mode buses how far each consumer group is
/// behind ([`Bus::consumer_lag`]) and sets [`CONSUMER_LAG`] and [`CONSUMER_PENDING`]
/// (labels `app`, `bus`, `transport`, `mode`, `group`). The buses are asked concurrently; one
/// that fails or does not answer within [`LAG_TIMEOUT`] keeps its previous values. It costs
/// broker round trips (Redis: one `SMEMBERS` and one `XINFO GROUPS` per stream key; NATS:
/// one consumer listing), so it runs at scrape time: [`scrape`] and [`serve`] call it.
pub async fn collect_lag() {
    let buses: Vec<(BusLabels, Arc<dyn Bus>)> =
        live_sources().iter().flat_map(|s| s.lag_buses()).collect();
    let answers = futures::future::join_all(buses.iter().map(|(labels, bus)| async move {
        match tokio::time::timeout(LAG_TIMEOUT, bus.consumer_lag()).await {
            Ok(Ok(groups)) => Some((labels, groups)),
            Ok(Err(e)) => {
                tracing::debug!(bus = %labels.bus, error = %e, "consumer lag not read");
                None
            }
            Err(_) => {
                tracing::debug!(bus = %labels.bus, "consumer lag not read: timed out");
                None
            }
        }
    }))
    .await;
    let mut last = LAG_SERIES.lock();
    for (labels, groups) in answers.into_iter().flatten() {
        export_lag(labels, &groups, last.entry(labels.clone()).or_default());
    }
}

/// Sets one bus's lag series from `groups`, zeroing those in `seen` that are gone.
fn export_lag(labels: &BusLabels, groups: &[GroupLag], seen: &mut BTreeSet<String>) {
    use ::metrics::gauge;
    let with_group = |group: &str| {
        let mut l = labels.labels();
        l.push(Label::new("group", group.to_string()));
        l
    };
    let now: BTreeSet<String> = groups.iter().map(|g| g.group.clone()).collect();
    for gone in seen.difference(&now) {
        gauge!(CONSUMER_LAG, with_group(gone)).set(0.0);
        gauge!(CONSUMER_PENDING, with_group(gone)).set(0.0);
    }
    for g in groups {
        let l = with_group(&g.group);
        if let Some(lag) = g.lag {
            gauge!(CONSUMER_LAG, l.clone()).set(lag as f64);
        }
        gauge!(CONSUMER_PENDING, l).set(g.pending as f64);
    }
    *seen = now;
}

/// [`collect`], then [`collect_lag`]: everything a scrape needs. With a recorder of your
/// own, await it before each export.
pub async fn scrape() {
    collect();
    collect_lag().await;
}

/// The labels of one bus: app, bus, transport, mode.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BusLabels {
    pub(crate) app: Arc<str>,
    pub(crate) bus: Arc<str>,
    pub(crate) transport: Arc<str>,
    pub(crate) mode: &'static str,
}

impl BusLabels {
    pub(crate) fn labels(&self) -> Vec<Label> {
        vec![
            Label::new("app", self.app.to_string()),
            Label::new("bus", self.bus.to_string()),
            Label::new("transport", self.transport.to_string()),
            Label::new("mode", self.mode),
        ]
    }
}

/// The mode label of a bus.
pub(crate) fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Broadcast => "broadcast",
        Mode::Stream => "stream",
    }
}

/// One bus's hot-path histograms, registered with the recorder on first use (after
/// [`enable`]), so a router built before the recorder was installed still records.
pub(crate) struct BusHandles {
    /// The app label, shared with the router (set after the router is assembled).
    app: Arc<RwLock<Arc<str>>>,
    bus: Arc<str>,
    transport: Arc<str>,
    mode: &'static str,
    hists: OnceLock<(Histogram, Histogram)>,
}

impl BusHandles {
    pub(crate) fn new(
        app: Arc<RwLock<Arc<str>>>,
        bus: Arc<str>,
        transport: Arc<str>,
        mode: Mode,
    ) -> BusHandles {
        BusHandles {
            app,
            bus,
            transport,
            mode: mode_label(mode),
            hists: OnceLock::new(),
        }
    }

    pub(crate) fn labels(&self) -> BusLabels {
        BusLabels {
            app: self.app.read().clone(),
            bus: self.bus.clone(),
            transport: self.transport.clone(),
            mode: self.mode,
        }
    }

    fn hists(&self) -> &(Histogram, Histogram) {
        self.hists.get_or_init(|| {
            let labels = self.labels().labels();
            (
                ::metrics::histogram!(PUBLISH_SECONDS, labels.clone()),
                ::metrics::histogram!(DELIVERY_SECONDS, labels),
            )
        })
    }

    /// Records one publish's duration.
    pub(crate) fn publish(&self, seconds: f64) {
        self.hists().0.record(seconds);
    }

    /// Records one delivery's end-to-end latency from its `timestamp_us` header.
    pub(crate) fn delivered(&self, timestamp_us: u64) {
        let now = crate::message::now_micros();
        self.hists()
            .1
            .record(now.saturating_sub(timestamp_us) as f64 / 1e6);
    }
}

/// Sets the scrape-time series of one bus from its stats.
pub(crate) fn export_bus(labels: &BusLabels, s: &StatsSnapshot) {
    use ::metrics::{counter, gauge};
    let l = labels.labels();
    counter!(PUBLISHED, l.clone()).absolute(s.published);
    counter!(DELIVERED, l.clone()).absolute(s.delivered);
    counter!(DROPPED, l.clone()).absolute(s.dropped);
    counter!(REDELIVERED, l.clone()).absolute(s.redelivered);
    counter!(ERRORS, l.clone()).absolute(s.errors);
    counter!(DECODE_ERRORS, l.clone()).absolute(s.decode_errors);
    counter!(UNFRAMED, l.clone()).absolute(s.unframed);
    counter!(ACKED, l.clone()).absolute(s.acked);
    counter!(NACKED, l.clone()).absolute(s.nacked);
    counter!(RECONNECTS, l.clone()).absolute(s.reconnects);
    counter!(DEAD_LETTERED, l.clone()).absolute(s.dead_lettered);
    counter!(DUPLICATES, l.clone()).absolute(s.duplicates);
    gauge!(CONNECTIONS, l.clone()).set(s.connections as f64);
    for state in [Health::Up, Health::Connecting, Health::Closed] {
        let mut with_state = l.clone();
        with_state.push(Label::new("state", state.to_string()));
        gauge!(HEALTH, with_state).set(if s.health == state { 1.0 } else { 0.0 });
    }
}

/// The bus a stats snapshot is read from, with its labels, for [`collect`].
pub(crate) struct ProbedBus {
    pub(crate) bus: Weak<dyn Bus>,
    pub(crate) handles: Arc<BusHandles>,
}

#[cfg(feature = "prometheus")]
mod prometheus;
#[cfg(feature = "prometheus")]
pub use prometheus::{install, serve, MetricsServer};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_call_in_every_sampling_is_timed_per_thread() {
        std::thread::spawn(|| {
            set_latency_sampling(4);
            let picks: Vec<bool> = (0..12).map(|_| sampled()).collect();
            assert_eq!(picks.iter().filter(|p| **p).count(), 3, "{picks:?}");
            assert!(picks[0] && picks[4] && picks[8], "{picks:?}");
            set_latency_sampling(0);
            assert_eq!(latency_sampling(), 1);
            // The countdown in progress ends first; then every call is timed.
            let after: Vec<bool> = (0..8).map(|_| sampled()).collect();
            assert!(after[4..].iter().all(|p| *p), "{after:?}");
            set_latency_sampling(DEFAULT_LATENCY_SAMPLING);
        })
        .join()
        .unwrap();
    }
}
