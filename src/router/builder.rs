//! [`RouterBuilder`]: a router from buses and rules in code.

use super::*;

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
    pub(super) buses: Vec<(String, Arc<dyn Bus>)>,
    pub(super) routes: Vec<(String, Vec<String>)>,
    pub(super) default: Option<Vec<String>>,
    pub(super) cache_capacity: usize,
    pub(super) settings: Settings,
}

/// The router's own knobs, set at build time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub(super) dedup_window: usize,
    pub(super) drain_grace: Duration,
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
        Router::assemble(table, buses, cache_capacity, settings, None)
    }

    /// The validated table and the buses.
    pub(super) fn validate(self) -> Result<(RoutingTable, NamedBuses)> {
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
