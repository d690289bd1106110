//! What a router shows [`crate::metrics::collect`]: its buses' counters and health, its
//! subscriptions' queue depths, its reloads and table generation.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Weak;

use ::metrics::{counter, gauge, Label};

use super::*;
use crate::metrics::{
    export_bus, BusHandles, BusLabels, ProbedBus, Source, GENERATION, QUEUE_DEPTH, RELOADS,
    ROUTER_ERRORS,
};

/// The router's shared, read-at-scrape-time view of itself.
pub(super) struct Probe {
    /// The `app` label (the config's `[app] name`, `busway` for a router built in code).
    pub(super) app: Arc<RwLock<Arc<str>>>,
    /// The buses of the live state.
    pub(super) buses: RwLock<Vec<ProbedBus>>,
    pub(super) generation: AtomicU64,
    pub(super) reloads: AtomicU64,
    /// Failures the router itself decides: no route, closed.
    pub(super) counters: Arc<Counters>,
    /// The open subscriptions, so a reload can move them and a scrape can read their queues.
    pub(super) live: parking_lot::Mutex<Vec<Arc<LiveSub>>>,
    /// The queue-depth series set at the last scrape, so a gone subscription's reads 0.
    depth_series: parking_lot::Mutex<Vec<Vec<Label>>>,
}

impl Probe {
    pub(super) fn new(app: &str) -> Probe {
        Probe {
            app: Arc::new(RwLock::new(app.into())),
            buses: RwLock::new(Vec::new()),
            generation: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            counters: Arc::new(Counters::default()),
            live: parking_lot::Mutex::new(Vec::new()),
            depth_series: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// The metric handles of bus `name`: its transport is the config's kind when `config`
    /// has the bus, else what the bus says ([`Bus::transport_kind`]).
    pub(super) fn handles_for(
        &self,
        name: &Arc<str>,
        bus: &Arc<dyn Bus>,
        config: Option<&Config>,
    ) -> Arc<BusHandles> {
        let transport: Arc<str> = config.and_then(|c| c.buses.get(&**name)).map_or_else(
            || bus.transport_kind().into(),
            |b| b.transport.as_str().into(),
        );
        Arc::new(BusHandles::new(
            self.app.clone(),
            name.clone(),
            transport,
            bus.capabilities().mode,
        ))
    }

    /// Records the buses of a new live state.
    pub(super) fn set_buses(&self, buses: &NamedBuses, slots: &[u32], all: &BusSlots) {
        let probed = buses
            .iter()
            .zip(slots)
            .filter_map(|((_, bus), slot)| {
                Some(ProbedBus {
                    bus: Arc::downgrade(bus),
                    handles: all.handles(*slot)?,
                })
            })
            .collect();
        *self.buses.write() = probed;
    }
}

impl Source for Probe {
    fn lag_buses(&self) -> Vec<(BusLabels, Arc<dyn Bus>)> {
        self.buses
            .read()
            .iter()
            .filter_map(|b| {
                let labels = b.handles.labels();
                let bus = b.bus.upgrade()?;
                (labels.mode == "stream").then_some((labels, bus))
            })
            .collect()
    }

    fn collect(&self) {
        let app = self.app.read().clone();
        for b in self.buses.read().iter() {
            if let Some(bus) = b.bus.upgrade() {
                export_bus(&b.handles.labels(), &bus.stats());
            }
        }
        let router = vec![Label::new("app", app.to_string())];
        counter!(RELOADS, router.clone()).absolute(self.reloads.load(Relaxed));
        gauge!(GENERATION, router.clone()).set(self.generation.load(Relaxed) as f64);
        counter!(ROUTER_ERRORS, router).absolute(self.counters.errors.load(Relaxed));

        // Queue depth per (subscription, bus): summed over subscriptions with the same
        // pattern and group (several engine tasks may subscribe alike).
        let mut depths: BTreeMap<Vec<Label>, f64> = BTreeMap::new();
        let live: Vec<Arc<LiveSub>> = {
            let mut live = self.live.lock();
            live.retain(|ls| !ls.handle.is_closed());
            live.clone()
        };
        let bus_labels: BTreeMap<Arc<str>, Vec<Label>> = self
            .buses
            .read()
            .iter()
            .map(|b| {
                let l = b.handles.labels();
                (l.bus.clone(), l.labels())
            })
            .collect();
        for ls in &live {
            for (bus, depth) in ls.depths.lock().iter() {
                let (Some(labels), Some(n)) = (bus_labels.get(bus), depth.get()) else {
                    continue;
                };
                let mut labels = labels.clone();
                labels.push(Label::new("pattern", ls.pattern.as_str().to_string()));
                labels.push(Label::new(
                    "group",
                    ls.options.group.clone().unwrap_or_default(),
                ));
                *depths.entry(labels).or_default() += n as f64;
            }
        }
        let mut last = self.depth_series.lock();
        for gone in last.iter().filter(|l| !depths.contains_key(*l)) {
            gauge!(QUEUE_DEPTH, gone.clone()).set(0.0);
        }
        *last = depths.keys().cloned().collect();
        for (labels, n) in depths {
            gauge!(QUEUE_DEPTH, labels).set(n);
        }
    }
}

/// Registers `probe` for scrapes.
pub(super) fn register(probe: &Arc<Probe>) {
    let weak: Weak<Probe> = Arc::downgrade(probe);
    crate::metrics::register(weak);
}
