//! The [`Router`]: a [`Bus`] that sends each topic to the buses its routing table names.
//!
//! # Routing
//! A [`RoutingTable`] is an ordered list of rules `pattern -> buses` and an optional default.
//! The first rule whose pattern matches a topic decides; a rule naming several buses is a
//! *mirror* (a publish goes to all of them). A topic no rule matches goes to the default, and
//! without a default publishing it is an [`ErrorKind::NoRoute`] error.
//!
//! # The hot path
//! The router resolves a topic once and caches the answer (a sharded map
//! `topic -> buses`), so publishing a cached topic costs a load of the live state, a hash
//! and a read lock on top of the bus's own `publish` (see `benches/router.rs`): a single-bus
//! answer is the bus's slot in a table of buses, borrowed, so no `Arc` is cloned. The cache is
//! bounded: a shard that fills up is cleared, so a flood of distinct topics costs re-resolving,
//! never unbounded memory.
//!
//! # Live state
//! The table, the buses and the cache live together in one immutable state behind an
//! [`ArcSwap`], so [`Router::reload`] swaps all three at once: a publish sees either the old
//! state or the new one, never half of each. The router keeps a handle on each open
//! subscription (a handle on its merged per-bus parts) so a reload can add its parts on new buses before the swap
//! and end the ones on buses it no longer needs after the drain.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::transport::BoxFuture;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures::future::{join_all, try_join_all};
use parking_lot::RwLock;

use crate::bus::{Bus, Capabilities, Mode};
use crate::config::{BusConfig, Config, RouteConfig};
use crate::delivery::Delivery;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{new_message_id, Message};
use crate::metrics::BusHandles;
use crate::options::{StartFrom, SubscribeOptions};
use crate::registry::Registry;
use crate::stats::{Counters, Health, StatsSnapshot};
use crate::subscription::Subscription;
use crate::topic::{Pattern, PatternToken, Topic};

mod builder;
mod cache;
mod merge;
mod probe;
mod reload;
mod state;
mod table;

pub use builder::RouterBuilder;
pub(crate) use merge::Merged;
pub use reload::ReloadReport;
pub use table::RoutingTable;

use builder::Settings;
use cache::{BusSlots, RouteCache, Targets};
use merge::{merge_live, Accept, MergeHandle, SlotHandles};
use probe::Probe;
use reload::LiveSub;
use state::{NamedBuses, RouterState};
use table::no_route;

/// The number of topics a router caches when not told otherwise.
pub const DEFAULT_ROUTE_CACHE: usize = 65_536;
/// The message ids a router subscription on several buses remembers, when not told otherwise.
pub const DEFAULT_DEDUP_WINDOW: usize = 10_000;
/// How long a reload waits for in-flight messages to reach the old buses' subscriptions,
/// when not told otherwise.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_millis(500);

/// A bus of buses: publishes each topic to the bus (or buses) its [`RoutingTable`] names.
///
/// # Behavior
/// - `publish`: to the one bus of the topic's route, or to every bus of a mirror route, all
///   copies with the same message id (one is generated when the message has none), so
///   subscribers listening on several mirror buses can de-duplicate.
/// - `subscribe`: on every bus that can carry a matching topic
///   ([`RoutingTable::buses_for_pattern`]), merged into one stream
///   that keeps only the deliveries the table would have put
///   on the bus they came from (a dropped delivery is acked when ackable, so a stream bus
///   does not redeliver it forever). Its stats and `pending` are the sums over its per-bus
///   subscriptions, and count only what passes the filter as delivered.
///   A subscription listening on two buses or more (a mirror) delivers each message id once
///   within its de-duplication window ([`RouterBuilder::dedup_window`], `[router]
///   dedup_window`); copies dropped count in its stats' `duplicates`. A subscription on one
///   bus keeps no window. [`Router::reload`] moves open subscriptions to the new buses.
/// - `request`: sent on the first bus of the topic's route, with that bus's `request`.
/// - `flush`, `close`: every bus. `close` is idempotent.
/// - `stats`: the sum over buses (plus the router's own routing failures); per bus with
///   [`Router::bus_stats`].
/// - `capabilities`: what holds for every topic: the intersection over the buses the table
///   uses (stream mode only when all are stream; a flag only when all have it; the smallest
///   `max_payload`).
pub struct Router {
    state: ArcSwap<RouterState>,
    slots: BusSlots,
    closed: AtomicBool,
    /// Failures the router itself decides: no route, closed (shared with `probe`).
    counters: Arc<Counters>,
    cache_capacity: usize,
    settings: Settings,
    /// What metrics read at scrape time; also holds the open subscriptions, so a reload can
    /// move them.
    probe: Arc<Probe>,
    /// Subscribes read it, a reload writes it while it re-plans subscriptions and swaps the
    /// state: a subscription is either moved by a reload or made on the new state.
    sub_gate: tokio::sync::RwLock<()>,
    /// One reload at a time.
    reload_gate: tokio::sync::Mutex<()>,
    /// How each bus was built, for buses from a config: a reload keeps a bus whose app and
    /// config did not change.
    specs: parking_lot::Mutex<BTreeMap<String, (String, BusConfig)>>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.load();
        f.debug_struct("Router")
            .field(
                "buses",
                &state.buses.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("table", &state.table)
            .field("closed", &self.closed.load(Relaxed))
            .finish()
    }
}

impl Router {
    /// Starts a builder.
    pub fn builder() -> RouterBuilder {
        RouterBuilder::default()
    }

    fn assemble(
        table: RoutingTable,
        mut buses: NamedBuses,
        cache_capacity: usize,
        settings: Settings,
        config: Option<&Config>,
    ) -> Result<Router> {
        buses.sort_by(|a, b| a.0.cmp(&b.0));
        let probe = Arc::new(Probe::new(config.map_or("busway", |c| c.app.as_str())));
        let slots = BusSlots::new();
        let indexes = buses
            .iter()
            .map(|(name, bus)| slots.push(bus.clone(), probe.handles_for(name, bus, config)))
            .collect::<Result<Vec<u32>>>()?;
        probe.set_buses(&buses, &indexes, &slots);
        probe::register(&probe);
        let state = RouterState::new(table, buses, &indexes, cache_capacity, 0);
        Ok(Router {
            state: ArcSwap::from_pointee(state),
            slots,
            closed: AtomicBool::new(false),
            counters: probe.counters.clone(),
            cache_capacity,
            settings,
            probe,
            sub_gate: tokio::sync::RwLock::new(()),
            reload_gate: tokio::sync::Mutex::new(()),
            specs: parking_lot::Mutex::new(BTreeMap::new()),
        })
    }

    /// Validates the routing table of `config`, then builds every bus through `registry`,
    /// then the router.
    ///
    /// # Errors
    /// What [`RoutingTable::from_config`] and the transports' factories return; when a bus
    /// fails to build, the buses already built are closed first.
    pub async fn from_config(config: &Config, registry: &Registry) -> Result<Router> {
        // The table first: a bad table should not open connections.
        let table = table_of(config)?;
        let buses = build_buses(config, registry, |_| None).await?;
        let settings = Settings {
            dedup_window: config.router.dedup_window.unwrap_or(DEFAULT_DEDUP_WINDOW),
            drain_grace: config
                .router
                .drain_grace
                .map_or(DEFAULT_DRAIN_GRACE, |d| d.0),
        };
        let router = Router::assemble(table, buses, DEFAULT_ROUTE_CACHE, settings, Some(config))?;
        *router.specs.lock() = specs_of(config);
        Ok(router)
    }
}

impl Router {
    /// [`Bus::publish`] with the publish span, and the duration histogram when `sampled`
    /// (see [`crate::metrics`] and [`crate::trace`]).
    fn publish_observed(&self, mut message: Message, sampled: bool) -> BoxFuture<'_, Result<()>> {
        use tracing::Instrument;
        let span = crate::trace::publish_span(&mut message);
        let targets = match self.resolve(&message.topic) {
            Ok(targets) => targets,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        if !span.is_disabled() {
            span.record("bus", targets.names.join(",").as_str());
        }
        let metrics = sampled;
        let handles = move |slot: u32| metrics.then(|| self.slots.handles(slot)).flatten();
        let future = async move {
            match &*targets.buses {
                [bus] => timed(bus.publish(message), handles(targets.slots[0])).await,
                _ => {
                    let hs = metrics.then(|| targets.slots.iter().map(|s| handles(*s)).collect());
                    Box::pin(publish_mirror(&targets, message, hs)).await
                }
            }
        };
        Box::pin(future.instrument(span))
    }

    /// The bus names `topic` goes to (several for a mirror), from the route cache.
    ///
    /// # Errors
    /// [`ErrorKind::NoRoute`] naming the topic.
    pub fn route(&self, topic: &Topic) -> Result<Arc<[Arc<str>]>> {
        Ok(self.state.load().resolve(topic)?.names.clone())
    }

    /// What the bus `topic` goes to can do (for a mirror, what every one of its buses can
    /// do). [`Bus::capabilities`] of the router is what holds for every topic; this is what
    /// holds for one.
    ///
    /// # Errors
    /// [`ErrorKind::NoRoute`] naming the topic.
    pub fn capabilities_for(&self, topic: &Topic) -> Result<Capabilities> {
        let targets = self.resolve(topic)?;
        Ok(intersect(targets.buses.iter().map(|b| b.capabilities())))
    }

    /// The routing table.
    pub fn table(&self) -> RoutingTable {
        self.state.load().table.clone()
    }

    /// A named bus.
    pub fn bus(&self, name: &str) -> Option<Arc<dyn Bus>> {
        self.state.load().bus(name).cloned()
    }

    /// Every bus with its name, sorted by name.
    pub fn buses(&self) -> Vec<(String, Arc<dyn Bus>)> {
        self.state
            .load()
            .buses
            .iter()
            .map(|(n, b)| (n.to_string(), b.clone()))
            .collect()
    }

    /// Every bus's stats with its name, sorted by name.
    pub fn bus_stats(&self) -> Vec<(String, StatsSnapshot)> {
        self.state
            .load()
            .buses
            .iter()
            .map(|(n, b)| (n.to_string(), b.stats()))
            .collect()
    }

    /// Checks that a subscription to `pattern` with `options` could be made: some route can
    /// carry a matching topic, and every bus it would listen on supports the options.
    ///
    /// # Errors
    /// [`ErrorKind::NoRoute`] naming the pattern; the bus's [`ErrorKind::Unsupported`] error
    /// (naming the bus) for a group or a replay on a bus that cannot do it.
    pub fn check_subscribe(&self, pattern: &Pattern, options: &SubscribeOptions) -> Result<()> {
        self.state
            .load()
            .plan_subscribe(pattern, options)
            .map(|_| ())
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Relaxed) {
            Counters::incr(&self.counters.errors);
            return Err(Error::closed("router"));
        }
        Ok(())
    }

    fn resolve(&self, topic: &Topic) -> Result<Arc<Targets>> {
        self.state.load().resolve(topic).inspect_err(|_| {
            Counters::incr(&self.counters.errors);
        })
    }
}

/// The routing table of `config`, which must name at least one bus.
fn table_of(config: &Config) -> Result<RoutingTable> {
    let table = RoutingTable::from_config(config)?;
    if config.buses.is_empty() {
        return Err(Error::config(format!(
            "{}: buses: a router needs at least one bus",
            config.source
        )));
    }
    Ok(table)
}

fn specs_of(config: &Config) -> BTreeMap<String, (String, BusConfig)> {
    config
        .buses
        .iter()
        .map(|(name, c)| (name.clone(), (config.app.clone(), c.clone())))
        .collect()
}

/// Every bus of `config`: the one `keep` returns for its name, or a new one from `registry`.
/// When a build fails, the buses built here so far are closed.
async fn build_buses(
    config: &Config,
    registry: &Registry,
    keep: impl Fn(&str) -> Option<Arc<dyn Bus>>,
) -> Result<NamedBuses> {
    let mut buses: NamedBuses = Vec::with_capacity(config.buses.len());
    let mut built: Vec<Arc<dyn Bus>> = Vec::new();
    registry.validate(config)?;
    for name in config.buses.keys() {
        if let Some(bus) = keep(name) {
            buses.push((name.as_str().into(), bus));
            continue;
        }
        match registry.build(config, name).await {
            Ok(bus) => {
                built.push(bus.clone());
                buses.push((name.as_str().into(), bus));
            }
            Err(e) => {
                close_all(&built).await;
                return Err(e);
            }
        }
    }
    Ok(buses)
}

/// Closes buses, logging (not returning) failures: used on paths that already have an outcome.
async fn close_all(buses: &[Arc<dyn Bus>]) {
    for bus in buses {
        if let Err(e) = bus.close().await {
            tracing::warn!(bus = bus.name(), error = %e, "closing a bus");
        }
    }
}

/// What holds on every one of `all`: stream mode only when all are stream, a flag only when
/// all have it, the smallest `max_payload`. Nothing at all for an empty set.
fn intersect(mut all: impl Iterator<Item = Capabilities>) -> Capabilities {
    let Some(mut caps) = all.next() else {
        return Capabilities::broadcast(0);
    };
    for c in all {
        if c.mode != Mode::Stream {
            caps.mode = Mode::Broadcast;
        }
        caps.groups &= c.groups;
        caps.ack &= c.ack;
        caps.replay &= c.replay;
        caps.request_reply &= c.request_reply;
        caps.headers &= c.headers;
        caps.wildcards &= c.wildcards;
        caps.max_payload = caps.max_payload.min(c.max_payload);
    }
    caps
}

/// Publishes to every bus of a mirror, all copies with one message id.
async fn publish_mirror(
    targets: &Targets,
    mut message: Message,
    handles: Option<Vec<Option<Arc<BusHandles>>>>,
) -> Result<()> {
    // One id for every copy, so a subscriber on several mirror buses can de-duplicate.
    if message.headers.id.is_none() {
        message.headers.id = Some(new_message_id());
    }
    let results = match handles {
        None => join_all(targets.buses.iter().map(|b| b.publish(message.clone()))).await,
        Some(handles) => {
            join_all(
                targets
                    .buses
                    .iter()
                    .zip(handles)
                    .map(|(b, h)| timed(b.publish(message.clone()), h)),
            )
            .await
        }
    };
    first_error(&targets.names, results)
}

/// `publish`, recording its duration in `handles` when given.
async fn timed(publish: BoxFuture<'_, Result<()>>, handles: Option<Arc<BusHandles>>) -> Result<()> {
    let Some(h) = handles else {
        return publish.await;
    };
    let started = std::time::Instant::now();
    let result = publish.await;
    h.publish(started.elapsed().as_secs_f64());
    result
}

/// The first error of `results`, with the bus it came from.
fn first_error(names: &[Arc<str>], results: Vec<Result<()>>) -> Result<()> {
    match names.iter().zip(results).find(|(_, r)| r.is_err()) {
        Some((name, Err(e))) => Err(e.context(format_args!("bus {name:?}"))),
        _ => Ok(()),
    }
}

#[async_trait]
impl Bus for Router {
    fn name(&self) -> &str {
        "router"
    }

    fn capabilities(&self) -> Capabilities {
        let state = self.state.load();
        let used = state.table.used_buses();
        intersect(
            state
                .buses
                .iter()
                .filter(|(n, _)| used.is_empty() || used.contains(n))
                .map(|(_, b)| b.capabilities()),
        )
    }

    // The routing decision is made before any future is boxed: a cached single-bus topic
    // hands back that bus's own future, with no box of the router's.
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<()>> {
        if let Err(e) = self.check_open() {
            return Box::pin(std::future::ready(Err(e)));
        }
        // A sampled publish, or spans wanted: the observed path (one more boxed future).
        let timed = crate::metrics::enabled() && crate::metrics::sampled();
        if timed || crate::trace::spans_enabled() {
            return self.publish_observed(message, timed);
        }
        // The hot path: a cached topic with one bus hands back that bus's own future.
        let slot = self.state.load().cache.single(&message.topic);
        if let Some(bus) = slot.and_then(|slot| self.slots.get(slot)) {
            return bus.publish(message);
        }
        let targets = match self.resolve(&message.topic) {
            Ok(targets) => targets,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        Box::pin(async move {
            match &*targets.buses {
                [bus] => bus.publish(message).await,
                // Boxed: inline, the mirror's state would grow every publish's future.
                _ => Box::pin(publish_mirror(&targets, message, None)).await,
            }
        })
    }

    async fn subscribe(&self, pattern: Pattern, options: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let _gate = self.sub_gate.read().await;
        let state = self.state.load_full();
        let plan = state
            .plan_subscribe(&pattern, &options)
            .inspect_err(|_| Counters::incr(&self.counters.errors))?;
        let subs = try_join_all(
            plan.iter()
                .map(|(_, bus, _)| bus.subscribe(pattern.clone(), options.clone())),
        )
        .await?;
        let slots: Vec<u32> = plan.iter().map(|(_, _, s)| *s).collect();
        let mut depths = Vec::new();
        let parts = plan
            .into_iter()
            .zip(subs)
            .map(|((name, _, slot), sub)| {
                if let Some(d) = sub.queue_depth() {
                    depths.push((name.clone(), d));
                }
                (u64::from(slot), sub, Some(state.accept(name)))
            })
            .collect();
        // One part (the common case) keeps no de-duplication window until a reload adds one.
        let (sub, handle) = merge_live(
            pattern.clone(),
            state.generation,
            parts,
            self.settings.dedup_window,
            Some(self.slots.handles.clone()),
        );
        let live = Arc::new(LiveSub {
            pattern,
            options,
            handle,
            parts: parking_lot::Mutex::new(slots),
            depths: parking_lot::Mutex::new(depths),
        });
        let mut all = self.probe.live.lock();
        // Forget dropped subscriptions now and then, so the list stays near the open count.
        if all.len() >= 64 && all.len().is_power_of_two() {
            all.retain(|ls| !ls.handle.is_closed());
        }
        all.push(live);
        Ok(sub)
    }

    async fn request(&self, message: Message, timeout: Duration) -> Result<Message> {
        self.check_open()?;
        let targets = self.resolve(&message.topic)?;
        // A mirror asks its first bus only: one question, one answer.
        targets.buses[0].request(message, timeout).await
    }

    async fn flush(&self) -> Result<()> {
        let state = self.state.load_full();
        let results = join_all(state.buses.iter().map(|(_, b)| b.flush())).await;
        let names: Vec<Arc<str>> = state.buses.iter().map(|(n, _)| n.clone()).collect();
        first_error(&names, results)
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Relaxed) {
            return Ok(());
        }
        self.counters.set_health(Health::Closed);
        let state = self.state.load_full();
        let results = join_all(state.buses.iter().map(|(_, b)| b.close())).await;
        let names: Vec<Arc<str>> = state.buses.iter().map(|(n, _)| n.clone()).collect();
        first_error(&names, results)
    }

    fn stats(&self) -> StatsSnapshot {
        let mut total = self.counters.snapshot();
        for (_, bus) in self.state.load().buses.iter() {
            total.merge(&bus.stats());
        }
        total
    }
}
