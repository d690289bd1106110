//! The router's live state: table, buses and cache, swapped as one piece.

use super::*;

/// Buses with their names.
pub(super) type NamedBuses = Vec<(Arc<str>, Arc<dyn Bus>)>;

/// Everything a routing decision reads, swapped as one piece.
pub(super) struct RouterState {
    pub(super) table: RoutingTable,
    /// Sorted by name.
    pub(super) buses: NamedBuses,
    /// Each bus's place in the router's [`BusSlots`], index for index with `buses`: a bus's
    /// identity across reloads.
    pub(super) slots: Vec<u32>,
    /// 0 for the state a router is built with, one more at each reload.
    pub(super) generation: u64,
    /// Targets of rule `i` at `i`, then the default's.
    pub(super) targets: Vec<Arc<Targets>>,
    pub(super) cache: RouteCache,
}

impl RouterState {
    /// `buses` sorted by name, with each bus's place in the router's [`BusSlots`].
    pub(super) fn new(
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
                    slots: slots.into(),
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
    pub(super) fn resolve(&self, topic: &Topic) -> Result<Arc<Targets>> {
        if let Some(t) = self.cache.get(topic) {
            return Ok(t);
        }
        let i = self.table.choose(topic).ok_or_else(|| no_route(topic))?;
        let t = self.targets[i].clone();
        self.cache.insert(topic, &t);
        Ok(t)
    }

    pub(super) fn bus(&self, name: &str) -> Option<&Arc<dyn Bus>> {
        self.buses
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.buses[i].1)
    }

    /// Whether the table sends `topic` to bus `name`.
    pub(super) fn carries(&self, topic: &Topic, name: &str) -> bool {
        self.resolve(topic)
            .is_ok_and(|t| t.names.iter().any(|n| &**n == name))
    }

    /// The buses a subscription to `pattern` listens on (name, bus, slot), checked against
    /// `options`.
    pub(super) fn plan_subscribe(
        &self,
        pattern: &Pattern,
        options: &SubscribeOptions,
    ) -> Result<Plan> {
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
    pub(super) fn accept(self: &Arc<Self>, name: Arc<str>) -> Accept {
        let state = self.clone();
        Arc::new(move |d: &Delivery| state.carries(&d.message().topic, &name))
    }
}

/// Where a subscription listens: bus name, bus, slot.
pub(super) type Plan = Vec<(Arc<str>, Arc<dyn Bus>, u32)>;
