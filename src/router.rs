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
//! `topic -> buses`), so publishing a cached topic costs a hash, a read lock and an
//! `Arc` clone on top of the bus's own `publish` (see `benches/router.rs`). The cache is
//! bounded: a shard that fills up is cleared, so a flood of distinct topics costs re-resolving,
//! never unbounded memory.
//!
//! # Live state
//! The table, the buses and the cache live together in one immutable state behind an
//! [`ArcSwap`], so [`Router::reload`] swaps all three at once: a publish sees either the old
//! state or the new one, never half of each. The router keeps a handle on each open
//! subscription ([`MergeHandle`]) so a reload can add its parts on new buses before the swap
//! and end the ones on buses it no longer needs after the drain.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures::future::{join_all, try_join_all, BoxFuture};
use parking_lot::RwLock;

use crate::bus::{Bus, Capabilities, Mode};
use crate::config::{BusConfig, Config, RouteConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{new_message_id, Message};
use crate::options::{StartFrom, SubscribeOptions};
use crate::registry::{BuildContext, Registry};
use crate::stats::{Counters, Health, StatsSnapshot};
use crate::subscription::{Accept, Delivery, MergeHandle, Subscription};
use crate::topic::{Pattern, PatternToken, Topic};

/// The number of topics a router caches when not told otherwise.
pub const DEFAULT_ROUTE_CACHE: usize = 65_536;
/// The message ids a router subscription on several buses remembers, when not told otherwise.
pub const DEFAULT_DEDUP_WINDOW: usize = 10_000;
/// How long a reload waits for in-flight messages to reach the old buses' subscriptions,
/// when not told otherwise.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_millis(500);

/// One rule of a [`RoutingTable`].
#[derive(Debug, Clone)]
struct Rule {
    pattern: Pattern,
    to: Arc<[Arc<str>]>,
}

/// The ordered routing table: the first matching rule wins, then the default.
///
/// Built validated: every bus it names exists, no rule names a bus twice, and no rule is
/// fully shadowed by an earlier one (such a rule could never apply).
#[derive(Debug, Clone)]
pub struct RoutingTable {
    rules: Vec<Rule>,
    default: Option<Arc<[Arc<str>]>>,
}

/// `"<source>: <key>"`, or just the key when the table did not come from a file.
fn at(source: Option<&str>, key: &str) -> String {
    match source {
        Some(s) => format!("{s}: {key}"),
        None => key.to_string(),
    }
}

impl RoutingTable {
    /// The table a config describes.
    ///
    /// # Errors
    /// As [`RoutingTable::new`], naming the config's source file.
    pub fn from_config(config: &Config) -> Result<RoutingTable> {
        RoutingTable::new(
            &config.routes,
            config.default.as_deref(),
            config.buses.keys().map(String::as_str),
            Some(&config.source),
        )
    }

    /// Validates `routes` and `default` against the bus names `buses`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] naming `source` (when given) and the rule (`routes[i]`)
    /// or `default`: a rule or default naming no bus, an unknown bus or the same bus twice;
    /// a rule fully shadowed by an earlier rule (the message names the earlier rule).
    pub fn new<'a>(
        routes: &[RouteConfig],
        default: Option<&[String]>,
        buses: impl IntoIterator<Item = &'a str>,
        source: Option<&str>,
    ) -> Result<RoutingTable> {
        let mut known: Vec<&str> = buses.into_iter().collect();
        known.sort_unstable();
        known.dedup();
        let names = |key: &str, what: &str, to: &[String]| -> Result<Arc<[Arc<str>]>> {
            if to.is_empty() {
                return Err(Error::config(format!(
                    "{}: {what} names no bus",
                    at(source, key)
                )));
            }
            let mut out: Vec<Arc<str>> = Vec::with_capacity(to.len());
            for name in to {
                if known.binary_search(&name.as_str()).is_err() {
                    return Err(Error::config(format!(
                        "{}: {what} names unknown bus {name:?}; the buses are: {}",
                        at(source, key),
                        known.join(", ")
                    )));
                }
                if out.iter().any(|n| **n == **name) {
                    return Err(Error::config(format!(
                        "{}: {what} names bus {name:?} twice",
                        at(source, key)
                    )));
                }
                out.push(name.as_str().into());
            }
            Ok(out.into())
        };
        let mut rules: Vec<Rule> = Vec::with_capacity(routes.len());
        for (i, route) in routes.iter().enumerate() {
            let what = format!("the rule matching {:?}", route.pattern.as_str());
            let to = names(&format!("routes[{i}].to"), &what, &route.to)?;
            if let Some(j) = rules.iter().position(|r| r.pattern.covers(&route.pattern)) {
                return Err(Error::config(format!(
                    "{}: the rule matching {:?} is shadowed by routes[{j}] (match {:?}): every topic it matches is taken by routes[{j}] first, so it never applies; remove it or move it above routes[{j}]",
                    at(source, &format!("routes[{i}]")),
                    route.pattern.as_str(),
                    rules[j].pattern.as_str(),
                )));
            }
            rules.push(Rule {
                pattern: route.pattern.clone(),
                to,
            });
        }
        let default = default
            .map(|d| names("default.to", "the default", d))
            .transpose()?;
        Ok(RoutingTable { rules, default })
    }

    /// The bus names `topic` goes to (several for a mirror), scanning the rules in order.
    /// A [`Router`] caches this answer; see [`Router::route`].
    ///
    /// # Errors
    /// [`ErrorKind::NoRoute`] naming the topic when no rule matches and there is no default.
    pub fn lookup(&self, topic: &Topic) -> Result<&[Arc<str>]> {
        match self.choose(topic) {
            Some(i) if i < self.rules.len() => Ok(&self.rules[i].to),
            Some(_) => Ok(self.default.as_deref().unwrap_or_default()),
            None => Err(no_route(topic)),
        }
    }

    /// The index of the rule that takes `topic`, `rules.len()` for the default, `None` for
    /// no route.
    fn choose(&self, topic: &Topic) -> Option<usize> {
        match self.rules.iter().position(|r| r.pattern.matches(topic)) {
            Some(i) => Some(i),
            None => self.default.as_ref().map(|_| self.rules.len()),
        }
    }

    /// The rules in order: pattern and bus names.
    pub fn rules(&self) -> impl Iterator<Item = (&Pattern, &[Arc<str>])> {
        self.rules.iter().map(|r| (&r.pattern, &*r.to))
    }

    /// The default bus names, if any.
    pub fn default_buses(&self) -> Option<&[Arc<str>]> {
        self.default.as_deref()
    }

    /// Every bus the table sends something to (rules and default), sorted, without repeats.
    pub fn used_buses(&self) -> Vec<Arc<str>> {
        let mut all: Vec<Arc<str>> = self
            .rules
            .iter()
            .flat_map(|r| r.to.iter())
            .chain(self.default.iter().flat_map(|d| d.iter()))
            .cloned()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The buses that may carry a topic matching `pattern`, in table order without repeats:
    /// where a subscription to `pattern` must listen.
    ///
    /// Exact for the common cases and otherwise a superset (never missing a bus): a rule is
    /// left out when no topic matches both it and `pattern`, or when one earlier rule takes
    /// every such topic; the rules after one that covers `pattern` and the default are left
    /// out. A rule whose share of `pattern` is covered only by several earlier rules together
    /// is kept; the router filters what such a bus delivers anyway.
    pub fn buses_for_pattern(&self, pattern: &Pattern) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        let mut add = |to: &[Arc<str>]| {
            for name in to {
                if !out.contains(name) {
                    out.push(name.clone());
                }
            }
        };
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(common) = intersection(pattern, &rule.pattern) else {
                continue;
            };
            // An intersection too long to be a valid pattern is kept: over-subscribing is safe.
            let taken_earlier = common.is_some_and(|common| {
                self.rules[..i]
                    .iter()
                    .any(|earlier| earlier.pattern.covers(&common))
            });
            if taken_earlier {
                continue;
            }
            add(&rule.to);
            if rule.pattern.covers(pattern) {
                // Every topic of `pattern` stops at this rule: later rules and the default
                // never see one.
                return out;
            }
        }
        if let Some(default) = &self.default {
            add(default);
        }
        out
    }
}

impl fmt::Display for RoutingTable {
    /// One line per rule (`routes[0]  marketdata.>  -> marketdata`), then the default,
    /// in aligned columns.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = |i: usize| format!("routes[{i}]");
        let lw = (0..self.rules.len())
            .map(|i| label(i).len())
            .chain(["default".len()])
            .max()
            .unwrap_or(0);
        let pw = self
            .rules
            .iter()
            .map(|r| r.pattern.as_str().len())
            .max()
            .unwrap_or(0);
        for (i, r) in self.rules.iter().enumerate() {
            writeln!(
                f,
                "{:lw$}  {:pw$}  -> {}",
                label(i),
                r.pattern.as_str(),
                r.to.join(", ")
            )?;
        }
        match &self.default {
            Some(d) => writeln!(f, "{:lw$}  {:pw$}  -> {}", "default", "", d.join(", ")),
            None => writeln!(
                f,
                "{:lw$}  (none: a topic no rule matches is a NoRoute error)",
                "default"
            ),
        }
    }
}

fn no_route(topic: &Topic) -> Error {
    Error::new(
        ErrorKind::NoRoute,
        format!(
            "no route for topic {:?}: no rule matches it and the routing table has no default bus",
            topic.as_str()
        ),
    )
}

/// The topics matching both `a` and `b`, as one pattern: `None` when they share no topic,
/// `Some(None)` when the intersection is too long to be a valid pattern.
fn intersection(a: &Pattern, b: &Pattern) -> Option<Option<Pattern>> {
    fn go<'a>(
        a: &'a [PatternToken],
        b: &'a [PatternToken],
        out: &mut Vec<&'a PatternToken>,
    ) -> bool {
        match (a.first(), b.first()) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            // `>` takes one or more tokens, and a non-empty rest matches one or more tokens:
            // the rest of the other pattern is the intersection.
            (Some(PatternToken::Rest), Some(_)) => {
                out.extend(b);
                true
            }
            (Some(_), Some(PatternToken::Rest)) => {
                out.extend(a);
                true
            }
            (Some(x @ PatternToken::Literal(l)), Some(PatternToken::Literal(m))) => {
                l == m && {
                    out.push(x);
                    go(&a[1..], &b[1..], out)
                }
            }
            (Some(x @ PatternToken::Literal(_)), Some(_)) | (Some(_), Some(x)) => {
                out.push(x);
                go(&a[1..], &b[1..], out)
            }
        }
    }
    let mut tokens = Vec::new();
    if !go(a.tokens(), b.tokens(), &mut tokens) {
        return None;
    }
    let text = tokens
        .iter()
        .map(|t| match t {
            PatternToken::Literal(l) => &**l,
            PatternToken::One => "*",
            PatternToken::Rest => ">",
        })
        .collect::<Vec<_>>()
        .join(".");
    Some(Pattern::new(text).ok())
}

/// Where one routing decision sends a message: names and buses, index for index.
struct Targets {
    names: Arc<[Arc<str>]>,
    buses: Box<[Arc<dyn Bus>]>,
    /// The bus's place in [`BusSlots`] when there is exactly one bus.
    slot: Option<u32>,
}

const SLOT_CHUNK: usize = 64;

type SlotChunk = Box<[OnceLock<Arc<dyn Bus>>]>;
const SLOT_CHUNKS: usize = 64;

/// Every bus a router has held, at addresses stable for the router's life, so a publish can
/// borrow its bus from `&self` and return the bus's own future: no `Arc` clone and no second
/// boxed future on the hot path. Append-only: a reload will add its new buses, and a
/// retired bus stays here, closed (at most `SLOT_CHUNK * SLOT_CHUNKS` buses over a router's
/// life).
struct BusSlots {
    chunks: Box<[OnceLock<SlotChunk>]>,
    len: parking_lot::Mutex<usize>,
}

impl BusSlots {
    fn new() -> BusSlots {
        BusSlots {
            chunks: (0..SLOT_CHUNKS).map(|_| OnceLock::new()).collect(),
            len: parking_lot::Mutex::new(0),
        }
    }

    fn push(&self, bus: Arc<dyn Bus>) -> Result<u32> {
        let mut len = self.len.lock();
        let chunk = self.chunks.get(*len / SLOT_CHUNK).ok_or_else(|| {
            Error::new(
                ErrorKind::Other,
                format!(
                    "a router holds at most {} buses over its life",
                    SLOT_CHUNK * SLOT_CHUNKS
                ),
            )
        })?;
        let slots = chunk.get_or_init(|| (0..SLOT_CHUNK).map(|_| OnceLock::new()).collect());
        // Only this function sets slots, under `len`'s lock, each slot once.
        let _ = slots[*len % SLOT_CHUNK].set(bus);
        let slot = *len as u32;
        *len += 1;
        Ok(slot)
    }

    #[inline]
    fn get(&self, slot: u32) -> Option<&Arc<dyn Bus>> {
        let slot = slot as usize;
        self.chunks.get(slot / SLOT_CHUNK)?.get()?[slot % SLOT_CHUNK].get()
    }
}

const CACHE_SHARDS: usize = 16;

type CacheShard = RwLock<HashMap<Topic, Arc<Targets>, foldhash::fast::RandomState>>;

/// A bounded, sharded `topic -> targets` cache. Shards spread lock traffic of different
/// topics; a shard at its bound is cleared rather than tracked for LRU, which keeps the hit
/// path to one read lock and one lookup.
struct RouteCache {
    shards: Box<[CacheShard]>,
    per_shard: usize,
    // Seeded apart from the maps' hasher: picking the shard with the maps' own hash bits
    // would leave every map in a shard with those bits all equal.
    shard_of: foldhash::fast::FixedState,
}

impl RouteCache {
    fn new(capacity: usize) -> RouteCache {
        RouteCache {
            shards: (0..CACHE_SHARDS).map(|_| RwLock::default()).collect(),
            per_shard: capacity.div_ceil(CACHE_SHARDS),
            shard_of: foldhash::fast::FixedState::with_seed(0x6275_7377_6179),
        }
    }

    #[inline]
    fn shard(&self, topic: &Topic) -> &CacheShard {
        let h = self.shard_of.hash_one(topic.as_str());
        &self.shards[(h >> 60) as usize % CACHE_SHARDS]
    }

    #[inline]
    fn get(&self, topic: &Topic) -> Option<Arc<Targets>> {
        if self.per_shard == 0 {
            return None;
        }
        self.shard(topic).read().get(topic.as_str()).cloned()
    }

    /// The slot of a cached topic's only bus; `None` when not cached or a mirror.
    #[inline]
    fn single(&self, topic: &Topic) -> Option<u32> {
        if self.per_shard == 0 {
            return None;
        }
        self.shard(topic).read().get(topic.as_str())?.slot
    }

    fn insert(&self, topic: &Topic, targets: &Arc<Targets>) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(topic).write();
        if shard.len() >= self.per_shard {
            shard.clear();
        }
        shard.insert(topic.clone(), targets.clone());
    }
}

/// Buses with their names.
type NamedBuses = Vec<(Arc<str>, Arc<dyn Bus>)>;

/// Everything a routing decision reads, swapped as one piece.
struct RouterState {
    table: RoutingTable,
    /// Sorted by name.
    buses: NamedBuses,
    /// Each bus's place in the router's [`BusSlots`], index for index with `buses`: a bus's
    /// identity across reloads.
    slots: Vec<u32>,
    /// 0 for the state a router is built with, one more at each reload.
    generation: u64,
    /// Targets of rule `i` at `i`, then the default's.
    targets: Vec<Arc<Targets>>,
    cache: RouteCache,
}

impl RouterState {
    /// `buses` sorted by name, with each bus's place in the router's [`BusSlots`].
    fn new(
        table: RoutingTable,
        buses: NamedBuses,
        slots: &[u32],
        cache_capacity: usize,
        generation: u64,
    ) -> RouterState {
        let find = |name: &Arc<str>| -> (Arc<dyn Bus>, u32) {
            let i = buses
                .binary_search_by(|(n, _)| (**n).cmp(&**name))
                .expect("the table was validated against these buses");
            (buses[i].1.clone(), slots[i])
        };
        let targets = table
            .rules
            .iter()
            .map(|r| &r.to)
            .chain(table.default.as_ref())
            .map(|names| {
                let (buses, slots): (Vec<_>, Vec<_>) = names.iter().map(find).unzip();
                Arc::new(Targets {
                    names: names.clone(),
                    buses: buses.into(),
                    slot: (slots.len() == 1).then(|| slots[0]),
                })
            })
            .collect();
        RouterState {
            table,
            buses,
            slots: slots.to_vec(),
            generation,
            targets,
            cache: RouteCache::new(cache_capacity),
        }
    }

    #[inline]
    fn resolve(&self, topic: &Topic) -> Result<Arc<Targets>> {
        if let Some(t) = self.cache.get(topic) {
            return Ok(t);
        }
        let i = self.table.choose(topic).ok_or_else(|| no_route(topic))?;
        let t = self.targets[i].clone();
        self.cache.insert(topic, &t);
        Ok(t)
    }

    fn bus(&self, name: &str) -> Option<&Arc<dyn Bus>> {
        self.buses
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.buses[i].1)
    }

    /// Whether the table sends `topic` to bus `name`.
    fn carries(&self, topic: &Topic, name: &str) -> bool {
        self.resolve(topic)
            .is_ok_and(|t| t.names.iter().any(|n| &**n == name))
    }

    /// The buses a subscription to `pattern` listens on (name, bus, slot), checked against
    /// `options`.
    fn plan_subscribe(&self, pattern: &Pattern, options: &SubscribeOptions) -> Result<Plan> {
        let names = self.table.buses_for_pattern(pattern);
        if names.is_empty() {
            return Err(Error::new(
                ErrorKind::NoRoute,
                format!(
                    "no route can carry a topic matching {:?}: no rule overlaps it and the routing table has no default bus",
                    pattern.as_str()
                ),
            ));
        }
        names
            .into_iter()
            .map(|name| {
                let i = self
                    .buses
                    .binary_search_by(|(n, _)| (**n).cmp(&*name))
                    .expect("the table was validated against these buses");
                let bus = self.buses[i].1.clone();
                bus.capabilities()
                    .check_subscribe(&name, pattern, options)?;
                Ok((name, bus, self.slots[i]))
            })
            .collect()
    }

    /// The rule a router subscription's part on bus `name` keeps deliveries by: what this
    /// state's table puts on that bus.
    fn accept(self: &Arc<Self>, name: Arc<str>) -> Accept {
        let state = self.clone();
        Arc::new(move |d: &Delivery| state.carries(&d.message().topic, &name))
    }
}

/// Where a subscription listens: bus name, bus, slot.
type Plan = Vec<(Arc<str>, Arc<dyn Bus>, u32)>;

/// Builds a [`Router`] from buses and rules in code. Errors surface at [`RouterBuilder::build`].
///
/// ```
/// # use std::sync::Arc;
/// # use busway::{Bus, MemoryBus, Router};
/// # fn main() -> busway::Result<()> {
/// let router = Router::builder()
///     .bus("marketdata", Arc::new(MemoryBus::new("marketdata")))
///     .bus("main", Arc::new(MemoryBus::new("main")))
///     .route("marketdata.>", &["marketdata"])
///     .default_to(&["main"])
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RouterBuilder {
    buses: Vec<(String, Arc<dyn Bus>)>,
    routes: Vec<(String, Vec<String>)>,
    default: Option<Vec<String>>,
    cache_capacity: usize,
    settings: Settings,
}

/// The router's own knobs, set at build time.
#[derive(Debug, Clone, Copy)]
struct Settings {
    dedup_window: usize,
    drain_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            dedup_window: DEFAULT_DEDUP_WINDOW,
            drain_grace: DEFAULT_DRAIN_GRACE,
        }
    }
}

impl Default for RouterBuilder {
    fn default() -> Self {
        RouterBuilder {
            buses: Vec::new(),
            routes: Vec::new(),
            default: None,
            cache_capacity: DEFAULT_ROUTE_CACHE,
            settings: Settings::default(),
        }
    }
}

impl RouterBuilder {
    /// Adds a named bus (the name the rules use, whatever `bus.name()` says).
    pub fn bus(mut self, name: &str, bus: Arc<dyn Bus>) -> Self {
        self.buses.push((name.to_string(), bus));
        self
    }

    /// Adds a rule: topics matching `pattern` go to the bus `to` names, or to every one of
    /// them (a mirror). Rules apply in the order added; the first match wins.
    pub fn route(mut self, pattern: &str, to: &[&str]) -> Self {
        self.routes.push((
            pattern.to_string(),
            to.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// Sets the bus (or buses) that take topics no rule matches.
    pub fn default_to(mut self, to: &[&str]) -> Self {
        self.default = Some(to.iter().map(|s| s.to_string()).collect());
        self
    }

    /// How many topics the route cache holds (default [`DEFAULT_ROUTE_CACHE`]); `0` turns
    /// the cache off.
    pub fn cache_capacity(mut self, topics: usize) -> Self {
        self.cache_capacity = topics;
        self
    }

    /// How many message ids a router subscription listening on two buses or more remembers
    /// to drop duplicate copies (default [`DEFAULT_DEDUP_WINDOW`]; `0` turns de-duplication
    /// off). Memory: about 32 bytes per id, per such subscription.
    pub fn dedup_window(mut self, ids: usize) -> Self {
        self.settings.dedup_window = ids;
        self
    }

    /// How long a reload waits, after swapping the table and flushing the old buses, for
    /// messages already in flight to reach the old buses' subscriptions before it ends them
    /// (default [`DEFAULT_DRAIN_GRACE`]).
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.settings.drain_grace = grace;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] for no bus, a bus name added twice, an invalid pattern
    /// (`routes[i].match`), and everything [`RoutingTable::new`] rejects.
    pub fn build(self) -> Result<Router> {
        let (cache_capacity, settings) = (self.cache_capacity, self.settings);
        let (table, buses) = self.validate()?;
        Router::assemble(table, buses, cache_capacity, settings)
    }

    /// The validated table and the buses.
    fn validate(self) -> Result<(RoutingTable, NamedBuses)> {
        if self.buses.is_empty() {
            return Err(Error::config("a router needs at least one bus"));
        }
        let mut buses: NamedBuses = Vec::with_capacity(self.buses.len());
        for (name, bus) in self.buses {
            if buses.iter().any(|(n, _)| **n == *name) {
                return Err(Error::config(format!("bus {name:?} is added twice")));
            }
            buses.push((name.into(), bus));
        }
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, (pattern, to)) in self.routes.into_iter().enumerate() {
            let pattern = Pattern::new(&pattern)
                .map_err(|e| Error::config(format!("routes[{i}].match: {}", e.message())))?;
            routes.push(RouteConfig { pattern, to });
        }
        let table = RoutingTable::new(
            &routes,
            self.default.as_deref(),
            buses.iter().map(|(n, _)| &**n),
            None,
        )?;
        Ok((table, buses))
    }
}

/// A bus of buses: publishes each topic to the bus (or buses) its [`RoutingTable`] names.
///
/// # Behavior
/// - `publish`: to the one bus of the topic's route, or to every bus of a mirror route, all
///   copies with the same message id (one is generated when the message has none), so
///   subscribers listening on several mirror buses can de-duplicate.
/// - `subscribe`: on every bus that can carry a matching topic
///   ([`RoutingTable::buses_for_pattern`]), merged into one stream
///   ([`Subscription::merge_live`]) that keeps only the deliveries the table would have put
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
    /// Failures the router itself decides: no route, closed.
    counters: Counters,
    cache_capacity: usize,
    settings: Settings,
    /// The open subscriptions, so a reload can move them.
    live: parking_lot::Mutex<Vec<Arc<LiveSub>>>,
    /// Subscribes read it, a reload writes it while it re-plans subscriptions and swaps the
    /// state: a subscription is either moved by a reload or made on the new state.
    sub_gate: tokio::sync::RwLock<()>,
    /// One reload at a time.
    reload_gate: tokio::sync::Mutex<()>,
    /// How each bus was built, for buses from a config: a reload keeps a bus whose app and
    /// config did not change.
    specs: parking_lot::Mutex<BTreeMap<String, (String, BusConfig)>>,
}

/// An open router subscription, as a reload sees it.
struct LiveSub {
    pattern: Pattern,
    options: SubscribeOptions,
    handle: MergeHandle,
    /// The slots of the buses it listens on.
    parts: parking_lot::Mutex<Vec<u32>>,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Buses built for the new table (new names, or a changed config under an old name).
    pub added: Vec<String>,
    /// Buses the new table no longer has, drained and closed.
    pub removed: Vec<String>,
    /// Buses kept as they were.
    pub kept: Vec<String>,
    /// Open subscriptions re-planned against the new table.
    pub subscriptions: usize,
    /// Of those, the ones that now listen on another set of buses.
    pub moved: usize,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "buses added: {}; removed: {}; kept: {}; subscriptions moved: {} of {}",
            list(&self.added),
            list(&self.removed),
            list(&self.kept),
            self.moved,
            self.subscriptions
        )
    }
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
    ) -> Result<Router> {
        buses.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = BusSlots::new();
        let indexes = buses
            .iter()
            .map(|(_, bus)| slots.push(bus.clone()))
            .collect::<Result<Vec<u32>>>()?;
        let state = RouterState::new(table, buses, &indexes, cache_capacity, 0);
        Ok(Router {
            state: ArcSwap::from_pointee(state),
            slots,
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            cache_capacity,
            settings,
            live: parking_lot::Mutex::new(Vec::new()),
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
                .drain_grace_ms
                .map_or(DEFAULT_DRAIN_GRACE, Duration::from_millis),
        };
        let router = Router::assemble(table, buses, DEFAULT_ROUTE_CACHE, settings)?;
        *router.specs.lock() = specs_of(config);
        Ok(router)
    }

    /// Swaps in the routing table and buses of `config`, without restarting and without
    /// losing a message in flight.
    ///
    /// # Behavior
    /// - A bus whose name, config and app are unchanged is kept as it is; any other bus of
    ///   `config` is built (a changed config under an old name is a new bus); buses `config`
    ///   no longer has are drained and closed at the end.
    /// - Every open subscription of this router is re-planned against the new table: it
    ///   subscribes on the buses the new table adds for its pattern *before* the swap (so
    ///   nothing published after the swap is missed; a stream subscription starts there at
    ///   new messages), and its parts on buses it no longer needs are ended only after the
    ///   drain: the old buses are flushed, [`RouterBuilder::drain_grace`] passes, and what
    ///   each part already holds is still delivered. During the switch a subscription hears
    ///   both the old and the new buses, so order across them is not kept; copies of one
    ///   message (a mirror) are dropped by its de-duplication window.
    /// - Publishes see the old state or the new one, never a mix (one atomic swap).
    /// - `[router]` settings and the cache size stay as built.
    ///
    /// # Errors
    /// Nothing changes on an error: the config's table errors, a bus that cannot be built
    /// (the buses already built for this reload are closed), [`ErrorKind::NoRoute`] or
    /// [`ErrorKind::Unsupported`] naming an open subscription the new table cannot carry,
    /// a subscribe that fails on a new bus, [`ErrorKind::Closed`] after `close`.
    pub async fn reload(&self, config: &Config, registry: &Registry) -> Result<ReloadReport> {
        let _one = self.reload_gate.lock().await;
        self.check_open()?;
        let table = table_of(config)?;
        let old = self.state.load_full();
        let specs = self.specs.lock().clone();
        let want = specs_of(config);
        let keep = |name: &str| -> Option<Arc<dyn Bus>> {
            (specs.contains_key(name) && specs.get(name) == want.get(name))
                .then(|| old.bus(name).cloned())
                .flatten()
        };
        let buses = build_buses(config, registry, keep).await?;
        let fresh: Vec<Arc<dyn Bus>> = buses
            .iter()
            .filter(|(_, b)| !old.buses.iter().any(|(_, o)| Arc::ptr_eq(o, b)))
            .map(|(_, b)| b.clone())
            .collect();
        match self.install(table, buses).await {
            Ok(report) => {
                *self.specs.lock() = want;
                Ok(report)
            }
            Err(e) => {
                close_all(&fresh).await;
                Err(e)
            }
        }
    }

    /// [`Router::reload`] for a router built in code: the table and buses of `builder`
    /// replace this router's (its cache size and settings are ignored). A bus is kept when
    /// `builder` names the same `Arc` as this router has; buses no longer named are drained
    /// and closed. On an error nothing changes (and the new buses are not closed: they are
    /// the caller's).
    ///
    /// # Errors
    /// What [`RouterBuilder::build`] rejects, and as [`Router::reload`].
    pub async fn reload_with(&self, builder: RouterBuilder) -> Result<ReloadReport> {
        let _one = self.reload_gate.lock().await;
        self.check_open()?;
        let (table, buses) = builder.validate()?;
        let report = self.install(table, buses).await?;
        self.specs.lock().clear();
        Ok(report)
    }

    /// Swaps in `table` over `buses` and moves the open subscriptions; see [`Router::reload`].
    /// The caller holds `reload_gate`.
    async fn install(&self, table: RoutingTable, mut buses: NamedBuses) -> Result<ReloadReport> {
        buses.sort_by(|a, b| a.0.cmp(&b.0));
        let old = self.state.load_full();
        let mut report = ReloadReport::default();
        let mut slots = Vec::with_capacity(buses.len());
        for (name, bus) in &buses {
            match old.buses.iter().position(|(_, o)| Arc::ptr_eq(o, bus)) {
                Some(i) => {
                    report.kept.push(name.to_string());
                    slots.push(old.slots[i]);
                }
                None => {
                    report.added.push(name.to_string());
                    slots.push(self.slots.push(bus.clone())?);
                }
            }
        }
        let retired: Vec<(Arc<str>, Arc<dyn Bus>)> = old
            .buses
            .iter()
            .zip(&old.slots)
            .filter(|(_, slot)| !slots.contains(slot))
            .map(|(b, _)| b.clone())
            .collect();
        report.removed = retired.iter().map(|(n, _)| n.to_string()).collect();
        let generation = old.generation + 1;
        let new = Arc::new(RouterState::new(
            table,
            buses,
            &slots,
            self.cache_capacity,
            generation,
        ));

        // Re-plan every open subscription and subscribe on its new buses, holding off new
        // subscriptions until the swap.
        let gate = self.sub_gate.write().await;
        let live = self.live_subs();
        let mut moves = Vec::with_capacity(live.len());
        for ls in &live {
            let plan = new.plan_subscribe(&ls.pattern, &ls.options).map_err(|e| {
                e.context(format_args!(
                    "the new routing table cannot carry an open subscription to {:?}",
                    ls.pattern.as_str()
                ))
            })?;
            let current = ls.parts.lock().clone();
            let mut options = ls.options.clone();
            options.start = StartFrom::New;
            let mut added = Vec::new();
            for (name, bus, slot) in &plan {
                if current.contains(slot) {
                    continue;
                }
                // On an error the subscriptions made so far are dropped with `moves`.
                let sub = bus
                    .subscribe(ls.pattern.clone(), options.clone())
                    .await
                    .map_err(|e| {
                        e.context(format_args!("resubscribing {:?}", ls.pattern.as_str()))
                    })?;
                added.push((name.clone(), *slot, sub));
            }
            moves.push((ls.clone(), plan, current, added));
        }
        for (ls, plan, current, added) in &mut moves {
            report.subscriptions += 1;
            let kept: Vec<&(Arc<str>, Arc<dyn Bus>, u32)> = plan
                .iter()
                .filter(|(_, _, s)| current.contains(s))
                .collect();
            if kept.len() != current.len() || !added.is_empty() {
                report.moved += 1;
            }
            for (name, _, slot) in kept {
                ls.handle
                    .accept_also(u64::from(*slot), generation, new.accept(name.clone()));
            }
            for (name, slot, sub) in added.drain(..) {
                ls.handle
                    .add(u64::from(slot), sub, generation, Some(new.accept(name)));
            }
            *ls.parts.lock() = plan.iter().map(|(_, _, s)| *s).collect();
        }
        self.state.store(new.clone());
        drop(gate);

        // Drain: what was published on the old state reaches its buses' subscriptions, then
        // the parts that are no longer needed end after their backlog.
        let flushed = join_all(old.buses.iter().map(|(_, b)| b.flush())).await;
        for ((name, _), r) in old.buses.iter().zip(flushed) {
            if let Err(e) = r {
                tracing::warn!(bus = &**name, error = %e, "flushing during a reload");
            }
        }
        tokio::time::sleep(self.settings.drain_grace).await;
        for (ls, plan, current, _) in &moves {
            for slot in current {
                if plan.iter().any(|(_, _, s)| s == slot) {
                    ls.handle
                        .forget_before_after_backlog(u64::from(*slot), generation);
                } else {
                    ls.handle.end_after_backlog(u64::from(*slot));
                }
            }
        }
        close_all(&retired.into_iter().map(|(_, b)| b).collect::<Vec<_>>()).await;
        Ok(report)
    }

    /// The open subscriptions, forgetting the ones that were dropped or ended.
    fn live_subs(&self) -> Vec<Arc<LiveSub>> {
        let mut live = self.live.lock();
        live.retain(|ls| !ls.handle.is_closed());
        live.clone()
    }

    /// The bus names `topic` goes to (several for a mirror), from the route cache.
    ///
    /// # Errors
    /// [`ErrorKind::NoRoute`] naming the topic.
    pub fn route(&self, topic: &Topic) -> Result<Arc<[Arc<str>]>> {
        Ok(self.state.load().resolve(topic)?.names.clone())
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
    for (name, bus_config) in &config.buses {
        if let Some(bus) = keep(name) {
            buses.push((name.as_str().into(), bus));
            continue;
        }
        let ctx = BuildContext {
            app: &config.app,
            bus: name,
            config: bus_config,
            source: &config.source,
        };
        match registry.build(ctx).await {
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

/// Publishes to every bus of a mirror, all copies with one message id.
async fn publish_mirror(targets: &Targets, mut message: Message) -> Result<()> {
    // One id for every copy, so a subscriber on several mirror buses can de-duplicate.
    if message.headers.id.is_none() {
        message.headers.id = Some(new_message_id());
    }
    let results = join_all(targets.buses.iter().map(|b| b.publish(message.clone()))).await;
    first_error(&targets.names, results)
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
        let mut buses = state
            .buses
            .iter()
            .filter(|(n, _)| used.is_empty() || used.contains(n))
            .map(|(_, b)| b.capabilities());
        let Some(mut caps) = buses.next() else {
            return Capabilities::broadcast(0);
        };
        for c in buses {
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

    // Written out rather than `async fn`, so the routing decision is made before any future
    // is boxed, and a cached single-bus topic costs no box of the router's own.
    fn publish<'s, 'f>(&'s self, message: Message) -> BoxFuture<'f, Result<()>>
    where
        's: 'f,
        Self: 'f,
    {
        if let Err(e) = self.check_open() {
            return Box::pin(std::future::ready(Err(e)));
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
                _ => Box::pin(publish_mirror(&targets, message)).await,
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
        let parts = plan
            .into_iter()
            .zip(subs)
            .map(|((name, _, slot), sub)| (u64::from(slot), sub, Some(state.accept(name))))
            .collect();
        // One part (the common case) keeps no de-duplication window until a reload adds one.
        let (sub, handle) = Subscription::merge_live(
            pattern.clone(),
            state.generation,
            parts,
            self.settings.dedup_window,
        );
        let live = Arc::new(LiveSub {
            pattern,
            options,
            handle,
            parts: parking_lot::Mutex::new(slots),
        });
        let mut all = self.live.lock();
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
