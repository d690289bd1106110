//! Live reload: swap in a new table and buses, moving open subscriptions.

use super::*;

/// An open router subscription, as a reload sees it.
pub(super) struct LiveSub {
    pub(super) pattern: Pattern,
    pub(super) options: SubscribeOptions,
    pub(super) handle: MergeHandle,
    /// The slots of the buses it listens on.
    pub(super) parts: parking_lot::Mutex<Vec<u32>>,
    /// Its per-bus queues, by bus name, for the queue-depth gauge.
    pub(super) depths: parking_lot::Mutex<Vec<(Arc<str>, crate::queue::QueueDepth)>>,
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

impl Router {
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
        match self.install(table, buses, Some(config)).await {
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
        let report = self.install(table, buses, None).await?;
        self.specs.lock().clear();
        Ok(report)
    }

    /// Swaps in `table` over `buses` and moves the open subscriptions; see [`Router::reload`].
    /// The caller holds `reload_gate`.
    pub(super) async fn install(
        &self,
        table: RoutingTable,
        mut buses: NamedBuses,
        config: Option<&Config>,
    ) -> Result<ReloadReport> {
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
                    let handles = self.probe.handles_for(name, bus, config);
                    slots.push(self.slots.push(bus.clone(), handles)?);
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
            if plan.iter().any(|(_, _, slot)| !current.contains(slot)) {
                // Before the new buses' subscriptions start: what the old parts deliver from
                // now on is remembered, so its copies through the new parts are dropped.
                ls.handle.remember_ids();
            }
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
                if let Some(d) = sub.queue_depth() {
                    ls.depths.lock().push((name.clone(), d));
                }
                ls.handle
                    .add(u64::from(slot), sub, generation, Some(new.accept(name)));
            }
            *ls.parts.lock() = plan.iter().map(|(_, _, s)| *s).collect();
        }
        self.state.store(new.clone());
        drop(gate);
        self.probe.set_buses(&new.buses, &new.slots, &self.slots);
        self.probe.generation.store(generation, Relaxed);
        self.probe.reloads.fetch_add(1, Relaxed);

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
    pub(super) fn live_subs(&self) -> Vec<Arc<LiveSub>> {
        let mut live = self.probe.live.lock();
        live.retain(|ls| !ls.handle.is_closed());
        live.clone()
    }
}
